//! Starting a sandbox from an image: warm from a pool member, else warm
//! from the image's template, else a cold boot. Each warm step that fails
//! before the guest ran anything falls back to the next and says why.

use std::time::{Duration, Instant};

use kiln_api::sandbox::{SandboxSpec as PortableSpec, SpecError, StartPreference};
use kiln_image::Progress;

use super::{ImageOpError, Node, PullPolicy, SupervisorError, hostname_of};
use crate::compose::{self, ComposeError, Overrides};
use crate::shim::ReadyLine;
use crate::store::{SandboxRecord, SandboxSpec, StoreError};

/// What a run asks for.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub spec: PortableSpec,
    pub pull: PullPolicy,
    /// Registries reached over plain HTTP (`host[:port]`).
    pub insecure_registries: Vec<String>,
    /// The sandbox's ID when the control plane chose it (`kiln node`);
    /// `None`: a fresh one. A given ID never starts from a pool member
    /// (a member has its own ID) and is refused if it exists already.
    pub id: Option<String>,
    /// Node template name → the name the caller knows it by (the node
    /// daemon: the server template of the sandbox's tenant that the node
    /// template was made for), for the notes. Empty: the node's names.
    pub template_names: std::collections::BTreeMap<String, String>,
}

impl RunRequest {
    /// How template `name` is called in this request's notes.
    fn shown<'a>(&'a self, name: &'a str) -> &'a str {
        self.template_names.get(name).map_or(name, String::as_str)
    }

    /// `text` with every node template name replaced by its shown name.
    fn rename(&self, text: &str) -> String {
        self.template_names
            .iter()
            .fold(text.to_owned(), |t, (local, shown)| {
                t.replace(local.as_str(), shown)
            })
    }
}

/// How a sandbox was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPath {
    /// A member of the template's warm pool was claimed.
    Pool { template: String },
    /// The template was restored.
    Template { template: String },
    /// The VM was booted.
    Cold,
}

/// A sandbox whose supervisor reported (`ready.ok` says whether its main
/// process runs).
#[derive(Debug, Clone)]
pub struct Started {
    pub id: String,
    pub ready: ReadyLine,
    pub shim_pid: u32,
    pub path: StartPath,
    /// The image's manifest digest.
    pub image_digest: String,
    /// One line each on how the start went (image, warm or why cold,
    /// fallbacks), for `kiln run -v`.
    pub notes: Vec<String>,
    /// Milliseconds from the call to the image being resolved (pulled if
    /// needed, base disk ready), and to the supervisor being spawned (or
    /// the pool member claimed): `kiln run -v`'s breakdown.
    pub resolved_ms: u64,
    pub spawned_ms: u64,
}

impl Started {
    /// What the node reports of this start (`ready_ms`: from the call to
    /// its return, on the caller's clock).
    pub fn report(&self, ready_ms: u64) -> kiln_api::sandbox::StartReport {
        use kiln_api::sandbox::{StartKind, StartReport};
        let (path, template) = match &self.path {
            StartPath::Pool { template } => (StartKind::Pool, Some(template.clone())),
            StartPath::Template { template } => (StartKind::Template, Some(template.clone())),
            StartPath::Cold => (StartKind::Cold, None),
        };
        StartReport {
            path,
            template,
            notes: self.notes.clone(),
            phases: start_phases(
                self.resolved_ms,
                self.spawned_ms,
                ready_ms,
                self.ready.timings,
                self.path != StartPath::Cold,
            ),
            ready_ms,
        }
    }
}

/// Each phase's own duration: `resolve` (image ready), `prepare` (disk,
/// network, pool claim), then the supervisor's (`VMM spawn`, `boot` or
/// `restore`, `configure`, `exec`; one `supervisor` phase when it gave no
/// timings). `resolved_ms`, `spawned_ms` and `ready_ms` are from the
/// start's beginning.
pub fn start_phases(
    resolved_ms: u64,
    spawned_ms: u64,
    ready_ms: u64,
    supervisor: Option<crate::shim::StartTimings>,
    warm: bool,
) -> Vec<kiln_api::sandbox::StartPhase> {
    let phase = |name: &str, ms: u64| kiln_api::sandbox::StartPhase {
        name: name.to_owned(),
        ms,
    };
    let mut phases = vec![
        phase("resolve", resolved_ms),
        phase("prepare", spawned_ms.saturating_sub(resolved_ms)),
    ];
    let supervised = ready_ms.saturating_sub(spawned_ms);
    match supervisor {
        Some(t) => {
            // The supervisor's own start-up and report: what its timings
            // do not cover of the time waited for it.
            let spawn = supervised.saturating_sub(t.exec_ms) + t.vm_ms;
            phases.push(phase("VMM spawn", spawn));
            phases.push(phase(
                if warm { "restore" } else { "boot" },
                t.agent_ms.saturating_sub(t.vm_ms),
            ));
            phases.push(phase(
                "configure",
                t.configure_ms.saturating_sub(t.agent_ms),
            ));
            phases.push(phase("exec", t.exec_ms.saturating_sub(t.configure_ms)));
        }
        None => phases.push(phase("supervisor", supervised)),
    }
    phases
}

/// A sandbox could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Image(#[from] ImageOpError),
    #[error(transparent)]
    Compose(#[from] ComposeError),
    #[error(transparent)]
    Limits(#[from] kiln_api::proto::ExecLimitError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("network policy: {0}")]
    Policy(#[from] kiln_net::policy::LoadPolicyError),
    #[error("cannot set up the sandbox network")]
    OpenNetwork(#[from] kiln_net::OpenNetworkError),
    #[error("cannot attach the sandbox to the network")]
    Attach(#[from] kiln_net::AttachError),
    #[error(transparent)]
    BadPublish(#[from] kiln_net::publish::ParsePublishError),
    #[error("cannot publish the port")]
    Publish(#[from] kiln_net::PublishError),
    /// The server's ID named a pool member that another run claimed (or
    /// that could not be claimed) first: never adopt that sandbox.
    #[error("pool member {0} was taken before this sandbox could claim it")]
    MemberTaken(String),
    #[error("{what} {asked} MiB is more than this host has ({has} MiB)")]
    Capacity {
        what: &'static str,
        asked: u64,
        has: u64,
    },
}

impl Node {
    /// Resolves `spec` against the image (pulled per `pull`): the process
    /// the sandbox runs, with `docker run` semantics.
    pub async fn resolve(
        &self,
        req: &RunRequest,
        progress: &dyn Progress,
    ) -> Result<(SandboxSpec, bool), RunError> {
        let spec = &req.spec;
        spec.validate()?;
        self.check_capacity(&spec.resources)?;
        let (image, cached) = self
            .pull(&spec.image, &req.insecure_registries, req.pull, progress)
            .await?;
        let ov = Overrides {
            entrypoint: spec.entrypoint.clone(),
            args: spec.cmd.clone(),
            env: spec.env.clone(),
            workdir: spec.workdir.clone(),
            user: spec.user.clone(),
            tty: spec.tty,
            // Set once the ID is known.
            hostname: String::new(),
        };
        let composed = compose::compose(&image.defaults, &ov, |_| None)?;
        // What `execve` would refuse is refused now, before a VM exists.
        kiln_api::proto::ExecRequest {
            argv: composed.argv.clone(),
            env: composed.env.clone(),
            cwd: None,
            user: None,
            tty: false,
            rows: None,
            cols: None,
            stdin: false,
            main: true,
            detached: false,
        }
        .check_limits()?;
        Ok((
            SandboxSpec {
                image: spec.image.clone(),
                image_digest: image.digest,
                image_disk: image.disk,
                argv: composed.argv,
                env: composed.env,
                cwd: composed.cwd,
                user: composed.user,
                tty: spec.tty,
                stdin: spec.stdin,
                cpus: spec.resources.cpus,
                memory_mib: spec.resources.memory_mib,
                disk_mib: spec.resources.disk_mib,
                timeout_secs: spec.timeout_secs,
                driver: spec.driver.to_string(),
                auto_remove: spec.auto_remove,
                log_limit: spec.log_limit,
                network: None,
            },
            cached,
        ))
    }

    /// Starts a sandbox for `req` (see the module doc) and returns once its
    /// supervisor reported.
    pub async fn run(
        &self,
        req: &RunRequest,
        progress: &dyn Progress,
    ) -> Result<Started, RunError> {
        let t0 = Instant::now();
        let mut notes = vec![];
        let policy = policy_of(&req.spec.network)?;
        let ports = publish_of(&req.spec.network)?;
        if policy.is_some() || !ports.is_empty() {
            // A bad network configuration (KILN_PROTECTED_CIDRS) or a host
            // port that is taken is refused before anything exists.
            open_network_for(self)?.check_publish(&ports)?;
        }
        let (spec, cached) = self.resolve(req, progress).await?;
        let resolved_ms = t0.elapsed().as_millis() as u64;
        notes.push(format!(
            "image {} ({}{}) ready in {} ms",
            spec.image,
            spec.image_digest,
            if cached { ", cached" } else { "" },
            t0.elapsed().as_millis()
        ));
        let image_digest = spec.image_digest.clone();
        let template = match req.spec.start {
            StartPreference::Cold => Err("--cold".to_string()),
            // A networked run restores a networked template (its VM has a
            // NIC) with a tap, lease and MAC of its own.
            StartPreference::Warm => self.find_template(&spec, policy.is_some()),
        };
        // The fastest start: a member of the template's warm pool. Whether
        // or not one was left, the pool is refilled in the background. A
        // networked run takes a member of a networked template's pool
        // (attached, with a deny-all policy, until the claim writes this
        // run's). A server-assigned ID takes a pool member only when it is
        // that member's ID (below); a run that publishes ports never does
        // (they are set up with the sandbox's own attachment).
        // A server-assigned ID takes the member it names, when the server
        // chose one of this pool's members (reported by the node daemon).
        let member = req.id.as_deref().filter(|id| {
            template
                .as_ref()
                .is_ok_and(|name| crate::pool::Pool::of(self.dirs(), name).is_offered(id))
        });
        if let Ok(name) = &template
            && ports.is_empty()
            && (req.id.is_none() || member.is_some())
        {
            let spawned_ms = t0.elapsed().as_millis() as u64;
            match self
                .claim_pool_member(name, &spec, policy.as_ref(), member)
                .await
            {
                Some(c) if !c.ready.ok && c.ready.restore_failed => {
                    // The member broke before running anything.
                    notes.push(format!(
                        "the pool member failed ({}); restoring the template",
                        c.ready.error.as_deref().unwrap_or("?")
                    ));
                    let _ = self
                        .wait_supervisor_gone(&c.id, Duration::from_secs(30), Some(c.shim_pid))
                        .await;
                    let _ = self.store.remove(&c.id);
                }
                Some(c) => {
                    notes.push(format!(
                        "warm start from the pool of template {} ({} ms after the command started)",
                        req.shown(name),
                        t0.elapsed().as_millis()
                    ));
                    return Ok(Started {
                        id: c.id,
                        ready: c.ready,
                        shim_pid: c.shim_pid,
                        path: StartPath::Pool {
                            template: name.clone(),
                        },
                        image_digest,
                        notes,
                        resolved_ms,
                        spawned_ms,
                    });
                }
                None => {}
            }
        }
        if let Some(id) = member
            && self.store.load(id).is_ok()
        {
            return Err(RunError::MemberTaken(id.to_string()));
        }
        let mut rec = self.create_record(req.id.clone(), spec)?;
        if let Some(policy) = &policy {
            self.attach_network(&mut rec, policy, &ports, &mut notes)?;
        }
        // A warm start when a template for exactly this exists (checked
        // like a snapshot before a restore), else a boot.
        let cold_reason = match template {
            Err(why) => Some(why),
            Ok(name) => match self.use_template(&name, &rec.id) {
                Ok(name) => {
                    rec.template = Some(name);
                    None
                }
                Err(why) => Some(why),
            },
        };
        self.store.save(&rec)?;
        match (&rec.template, &cold_reason) {
            (Some(name), _) => notes.push(format!(
                "warm start from template {} ({} ms after the command started)",
                req.shown(name),
                t0.elapsed().as_millis()
            )),
            (None, Some(why)) => notes.push(format!("cold boot: {}", req.rename(why))),
            (None, None) => {}
        }
        let mut spawned_ms = t0.elapsed().as_millis() as u64;
        let (mut ready, mut shim_pid) = match self.spawn_supervisor(&rec).await {
            Ok(r) => r,
            Err(e) => {
                self.release_template(&rec);
                super::release_network(self.dirs(), &rec.id);
                return Err(e.into());
            }
        };
        let mut path = match &rec.template {
            Some(t) => StartPath::Template {
                template: t.clone(),
            },
            None => StartPath::Cold,
        };
        if !ready.ok && ready.restore_failed && rec.template.is_some() {
            // The template could not be restored: boot instead, as a new
            // sandbox (the failed one never ran anything).
            let why = ready.error.clone().unwrap_or_default();
            notes.push(format!(
                "the warm start failed ({}); cold boot",
                req.rename(&why)
            ));
            let _ = self
                .wait_supervisor_gone(&rec.id, Duration::from_secs(30), Some(shim_pid))
                .await;
            self.release_template(&rec);
            let _ = self.store.remove(&rec.id);
            let mut spec = rec.spec.clone();
            let old = format!("HOSTNAME={}", hostname_of(&rec.id));
            for e in spec.env.iter_mut() {
                if *e == old {
                    *e = "HOSTNAME=".into();
                }
            }
            // The failed sandbox's supervisor released its network.
            spec.network = None;
            rec = self.create_record(req.id.clone(), spec)?;
            if let Some(policy) = &policy {
                self.attach_network(&mut rec, policy, &ports, &mut notes)?;
                self.store.save(&rec)?;
            }
            spawned_ms = t0.elapsed().as_millis() as u64;
            (ready, shim_pid) = self.spawn_supervisor(&rec).await?;
            path = StartPath::Cold;
        }
        if path == StartPath::Cold
            && ready.ok
            && req.spec.start == StartPreference::Warm
            && self.config.auto_templates
        {
            // The next run of this image with these resources starts warm.
            self.create_template_in_background(&req.spec);
            notes.push("making this image's template in the background".into());
        }
        Ok(Started {
            id: rec.id,
            ready,
            shim_pid,
            path,
            image_digest,
            notes,
            resolved_ms,
            spawned_ms,
        })
    }

    /// Refuses resources this host cannot give at all (memory beyond its
    /// RAM, a writable disk beyond the state directory's filesystem) before
    /// anything is created.
    pub fn check_capacity(&self, r: &kiln_api::sandbox::Resources) -> Result<(), RunError> {
        if let Some(total) = host_memory_mib()
            && u64::from(r.memory_mib) > total
        {
            return Err(RunError::Capacity {
                what: "memory",
                asked: r.memory_mib.into(),
                has: total,
            });
        }
        if let Ok(fs) = nix::sys::statvfs::statvfs(&self.dirs().state) {
            let size_mib = fs.blocks().saturating_mul(fs.fragment_size()) >> 20;
            if size_mib > 0 && u64::from(r.disk_mib) > size_mib {
                return Err(RunError::Capacity {
                    what: "disk",
                    asked: r.disk_mib.into(),
                    has: size_mib,
                });
            }
        }
        Ok(())
    }

    /// Attaches a new sandbox to the network (tap, lease, MAC, policy
    /// program) and records it in its spec; on error the record is gone.
    fn attach_network(
        &self,
        rec: &mut SandboxRecord,
        policy: &kiln_net::Policy,
        ports: &[kiln_net::Publish],
        notes: &mut Vec<String>,
    ) -> Result<(), RunError> {
        let attached = open_network_for(self).and_then(|net| {
            let a = net
                .attach(&rec.id, kiln_net::Endpoint::Tap, policy)
                .map_err(RunError::from)?;
            net.publish(&a, ports)?;
            Ok(a)
        });
        match attached {
            Ok(a) => {
                notes.push(format!(
                    "network: {} on {} ({})",
                    a.ip,
                    a.ifname,
                    kiln_net::format_mac(&a.mac)
                ));
                rec.spec.network = Some(a);
                Ok(())
            }
            Err(e) => {
                let _ = self.store.remove(&rec.id);
                super::release_network(self.dirs(), &rec.id);
                Err(e)
            }
        }
    }

    /// A new sandbox record for `spec`; `HOSTNAME` becomes its short ID.
    pub(crate) fn create_record(
        &self,
        id: Option<String>,
        spec: SandboxSpec,
    ) -> Result<SandboxRecord, StoreError> {
        let mut rec = match id {
            Some(id) => self.store.create_with_id(id, spec)?,
            None => self.store.create(spec)?,
        };
        let host = hostname_of(&rec.id);
        for e in rec.spec.env.iter_mut() {
            if e == "HOSTNAME=" {
                *e = format!("HOSTNAME={host}");
            }
        }
        self.store.save(&rec)?;
        Ok(rec)
    }
}

fn open_network_for(node: &Node) -> Result<kiln_net::Network, RunError> {
    Ok(super::open_network(node.dirs())?)
}

/// The policy a spec's network asks for (`None`: no network), checked.
pub fn policy_of(
    net: &kiln_api::sandbox::NetworkSpec,
) -> Result<Option<kiln_net::Policy>, kiln_net::policy::LoadPolicyError> {
    use kiln_api::sandbox::{NetworkSpec, PolicyAction};
    let action = |a: PolicyAction| match a {
        PolicyAction::Allow => kiln_net::Action::Allow,
        PolicyAction::Deny => kiln_net::Action::Deny,
    };
    match net {
        NetworkSpec::None => Ok(None),
        NetworkSpec::Default {
            policy,
            policy_default,
            rules,
            ..
        } => {
            // A preset, or a policy file the node can read.
            let base = kiln_net::Policy::load(policy.as_deref().unwrap_or("internet-only"))?;
            let rules: Vec<(kiln_net::Action, String)> = rules
                .iter()
                .map(|r| (action(r.action), r.rule.clone()))
                .collect();
            kiln_net::Policy::from_flags(Some(base), policy_default.map(action), &rules).map(Some)
        }
    }
}

/// The ports a spec's network publishes, checked.
pub fn publish_of(
    net: &kiln_api::sandbox::NetworkSpec,
) -> Result<Vec<kiln_net::Publish>, kiln_net::publish::ParsePublishError> {
    match net {
        kiln_api::sandbox::NetworkSpec::Default { publish, .. } => {
            publish.iter().map(|p| p.parse()).collect()
        }
        kiln_api::sandbox::NetworkSpec::None => Ok(vec![]),
    }
}

/// The host's RAM (`MemTotal`), MiB.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_name_templates_as_the_caller_knows_them() {
        let req = RunRequest {
            spec: PortableSpec::for_image("busybox"),
            pull: PullPolicy::Missing,
            insecure_registries: vec![],
            id: None,
            template_names: [("tpl-aa".to_string(), "web".to_string())].into(),
        };
        assert_eq!(req.shown("tpl-aa"), "web");
        assert_eq!(req.shown("tpl-bb"), "tpl-bb");
        assert_eq!(
            req.rename("template tpl-aa is stale; this image has tpl-aa (1 CPU), tpl-bb"),
            "template web is stale; this image has web (1 CPU), tpl-bb"
        );
    }
}
