//! Processes: signals, attach, exec, the copy workers and the pump that
//! moves their bytes between pipes and frames.

use super::*;

impl Agent {
    pub(super) fn signal(&mut self, pid: u32, signal: i32) -> Response {
        let Ok(sig) = Signal::try_from(signal) else {
            return err(ErrorKind::Invalid, format!("invalid signal {signal}"));
        };
        let Some(p) = self.procs.get(&pid).filter(|p| p.exit.is_none()) else {
            return err(
                ErrorKind::NoSuchProcess,
                format!("no running process with pid {pid}"),
            );
        };
        let target = if p.tty { -(pid as i32) } else { pid as i32 };
        match kill(Pid::from_raw(target), sig) {
            Ok(()) => Response::Ok,
            Err(e) => err(ErrorKind::NoSuchProcess, format!("kill {pid}: {e}")),
        }
    }

    pub(super) fn attach(&mut self, s: u32, pid: u32, stdin: bool) {
        let Some(p) = self.procs.get_mut(&pid) else {
            self.respond(
                s,
                &err(
                    ErrorKind::NoSuchProcess,
                    format!("no process with pid {pid}"),
                ),
            );
            self.queue(proto::encode_close(s));
            return;
        };
        if stdin && p.input.as_ref().is_none_or(|i| i.fd.is_none()) {
            let r = err(
                ErrorKind::Invalid,
                format!("process {pid} has no open stdin"),
            );
            self.respond(s, &r);
            self.queue(proto::encode_close(s));
            return;
        }
        let old = p.stream.replace(s);
        for o in &mut p.outs {
            o.reset_for_attach();
        }
        if let Some(i) = p.input.as_mut() {
            i.reset_for_attach();
            if !stdin {
                // The new host will not write: nothing more arrives.
                i.eof = true;
                i.maybe_close();
            }
        }
        if let Some(old) = old {
            self.streams.remove(&old);
            self.queue(proto::encode_close(old));
        }
        self.streams.insert(s, pid);
        self.respond(s, &Response::Started { pid });
    }

    pub(super) fn exec(&mut self, e: &ExecRequest) -> Result<u32, (ErrorKind, String)> {
        let Some(argv0) = e.argv.first() else {
            return Err((ErrorKind::Invalid, "exec: empty argv".into()));
        };
        let id = crate::users::resolve_in_root(e.user.as_deref().unwrap_or(""))
            .map_err(|x| (ErrorKind::NoSuchUser, x.to_string()))?;
        let cwd = PathBuf::from(e.cwd.as_deref().filter(|c| !c.is_empty()).unwrap_or("/"));
        if !cwd.is_absolute() {
            return Err((
                ErrorKind::Path,
                format!("working directory {} is not absolute", cwd.display()),
            ));
        }
        if !cwd.exists() {
            std::fs::create_dir_all(&cwd).map_err(|x| {
                (
                    ErrorKind::Path,
                    format!("creating working directory {}: {x}", cwd.display()),
                )
            })?;
            let _ = chown(&cwd, Some(id.uid), Some(id.gid));
        } else if !cwd.is_dir() {
            return Err((
                ErrorKind::Path,
                format!("working directory {} is not a directory", cwd.display()),
            ));
        }
        let prog = crate::lookup::find_program(argv0, &e.env, &cwd)?;
        let mut cmd = Command::new(&prog);
        cmd.arg0(argv0)
            .args(&e.argv[1..])
            .env_clear()
            .current_dir(&cwd);
        for kv in &e.env {
            if let Some((k, v)) = kv.split_once('=')
                && !k.is_empty()
            {
                cmd.env(k, v);
            }
        }
        // Like Docker: HOME comes from the user's passwd entry unless set.
        if !e.env.iter().any(|kv| kv.starts_with("HOME=")) {
            cmd.env("HOME", id.home.as_deref().unwrap_or("/"));
        }
        let ioerr = |what: &str, x: nix::Error| (ErrorKind::Internal, format!("{what}: {x}"));
        let mut outs = Vec::new();
        let mut input = None;
        let mut pty = None;
        if e.tty {
            let ws = nix::pty::Winsize {
                ws_row: e.rows.unwrap_or(24),
                ws_col: e.cols.unwrap_or(80),
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let p = nix::pty::openpty(&ws, None).map_err(|x| ioerr("openpty", x))?;
            set_cloexec(&p.master).map_err(|x| ioerr("fcntl", x))?;
            set_cloexec(&p.slave).map_err(|x| ioerr("fcntl", x))?;
            set_nonblock(&p.master).map_err(|x| ioerr("fcntl", x))?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|x| (ErrorKind::Internal, format!("dup: {x}")))
            };
            cmd.stdin(Stdio::from(dup(&p.slave)?))
                .stdout(Stdio::from(dup(&p.slave)?))
                .stderr(Stdio::from(p.slave));
            outs.push(OutPipe::new(Channel::Stdout, dup(&p.master)?));
            if e.stdin {
                input = Some(InPipe::new(Channel::Stdin, dup(&p.master)?));
            }
            pty = Some(p.master);
        } else {
            let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|x| ioerr("pipe", x));
            let (or, ow) = pipe()?;
            let (er, ew) = pipe()?;
            set_nonblock(&or).map_err(|x| ioerr("fcntl", x))?;
            set_nonblock(&er).map_err(|x| ioerr("fcntl", x))?;
            cmd.stdout(Stdio::from(ow)).stderr(Stdio::from(ew));
            outs.push(OutPipe::new(Channel::Stdout, or));
            outs.push(OutPipe::new(Channel::Stderr, er));
            if e.stdin {
                let (ir, iw) = pipe()?;
                set_nonblock(&iw).map_err(|x| ioerr("fcntl", x))?;
                cmd.stdin(Stdio::from(ir));
                input = Some(InPipe::new(Channel::Stdin, iw));
            } else {
                cmd.stdin(Stdio::null());
            }
            cmd.process_group(0);
        }
        sys::prepare(
            &mut cmd,
            sys::ChildSetup {
                uid: Uid::from_raw(id.uid),
                gid: Gid::from_raw(id.gid),
                groups: id.groups.iter().map(|g| Gid::from_raw(*g)).collect(),
                tty: e.tty,
            },
        );
        let child = cmd.spawn().map_err(|x| {
            let kind = match x.raw_os_error() {
                Some(libc::ENOENT) => ErrorKind::NotFound,
                Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) => {
                    ErrorKind::NotExecutable
                }
                _ => ErrorKind::Internal,
            };
            (kind, format!("exec: \"{argv0}\": {x}"))
        })?;
        let pid = child.id();
        // The child is reaped by the SIGCHLD loop, not through `child`.
        drop(child);
        drop(cmd);
        if e.main {
            self.main_pid = Some(pid);
        }
        self.procs.insert(
            pid,
            Proc {
                argv: e.argv.clone(),
                main: e.main,
                tty: e.tty,
                outs,
                input,
                pty,
                exit: None,
                stream: None,
                linger_until: None,
            },
        );
        Ok(pid)
    }

    pub(super) fn spawn_worker(
        &mut self,
        f: impl FnOnce() -> Result<(), (ErrorKind, String)> + Send + 'static,
    ) -> u64 {
        let id = self.next_job;
        self.next_job += 1;
        let results = Arc::clone(&self.results);
        let wake = Arc::clone(&self.wake_w);
        let spawned = std::thread::Builder::new()
            .name("kiln-copy".into())
            .spawn(move || {
                let r = f();
                if let Ok(mut v) = results.lock() {
                    v.push((id, r));
                }
                let _ = nix::unistd::write(wake.as_fd(), &[1]);
            });
        if let Err(e) = spawned
            && let Ok(mut v) = self.results.lock()
        {
            v.push((
                id,
                Err((ErrorKind::Internal, format!("spawning a worker: {e}"))),
            ));
        }
        id
    }

    pub(super) fn copy_in(&mut self, s: u32, dest: String) {
        let pipe = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                self.respond(s, &err(ErrorKind::Internal, format!("pipe: {e}")));
                return;
            }
        };
        let (r, w) = pipe;
        if let Err(e) = set_nonblock(&w) {
            self.respond(s, &err(ErrorKind::Internal, format!("fcntl: {e}")));
            return;
        }
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker_cancel = Arc::clone(&cancel);
        let id = self.spawn_worker(move || {
            let mut reader = File::from(r);
            let res = crate::copy::unpack(&mut reader, Path::new(&dest), &worker_cancel);
            // Drain the rest (tar padding) so the host's EOF goes through.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            match res {
                Ok(_) => Ok(()),
                Err(crate::copy::CopyError::NotADirectory(d)) => Err((
                    ErrorKind::Path,
                    format!("destination {d} is not a directory"),
                )),
                Err(e) => Err((ErrorKind::Invalid, e.to_string())),
            }
        });
        self.copies.insert(
            s,
            CopyJob {
                id,
                input: Some(InPipe::new(Channel::Tar, w)),
                output: None,
                result: None,
                responded: false,
                cancel,
            },
        );
    }

    pub(super) fn copy_out(&mut self, s: u32, path: String) {
        let p = PathBuf::from(&path);
        if !p.is_absolute() || std::fs::symlink_metadata(&p).is_err() {
            self.respond(
                s,
                &err(
                    ErrorKind::Path,
                    format!("{path}: no such file or directory"),
                ),
            );
            self.queue(proto::encode_close(s));
            return;
        }
        let (r, w) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                self.respond(s, &err(ErrorKind::Internal, format!("pipe: {e}")));
                return;
            }
        };
        if let Err(e) = set_nonblock(&r) {
            self.respond(s, &err(ErrorKind::Internal, format!("fcntl: {e}")));
            return;
        }
        let id = self.spawn_worker(move || {
            let writer = std::io::BufWriter::with_capacity(64 << 10, File::from(w));
            crate::copy::pack(&p, writer).map_err(|e| (ErrorKind::Path, e.to_string()))
        });
        self.respond(s, &Response::Ok);
        self.copies.insert(
            s,
            CopyJob {
                id,
                input: None,
                output: Some(OutPipe::new(Channel::Tar, r)),
                result: None,
                responded: true,
                cancel: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            },
        );
    }

    /// Moves buffered output into the outgoing queue as credit allows, and
    /// reports finished processes and copies.
    pub(super) fn pump(&mut self) {
        if !self.sending() {
            return;
        }
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let mut budget = OUTQ_HIGH.saturating_sub(self.outq_len());
        let mut finished: Vec<u32> = Vec::new();
        for (pid, p) in self.procs.iter_mut() {
            let Some(s) = p.stream else { continue };
            for o in p.outs.iter_mut() {
                drain_out(s, o, &mut budget, &mut frames);
            }
            if let Some(i) = p.input.as_mut() {
                credit_in(s, i, &mut frames);
            }
            if let Some(status) = p.exit
                && p.outs.iter().all(|o| o.done() && o.eof_sent)
            {
                let ev = Event::Exit { pid: *pid, status };
                match proto::encode_json(Kind::Event, s, &ev) {
                    Ok(f) => frames.push(f),
                    Err(e) => log!("encoding an exit event: {e}"),
                }
                frames.push(proto::encode_close(s));
                finished.push(*pid);
            }
        }
        for pid in finished {
            if let Some(p) = self.procs.get_mut(&pid) {
                if let Some(s) = p.stream.take() {
                    self.streams.remove(&s);
                }
                // The status was collected; the main process's stays for
                // HelloAck until shutdown.
                if !p.main {
                    self.procs.remove(&pid);
                }
            }
        }
        let mut done_copies = Vec::new();
        for (s, j) in self.copies.iter_mut() {
            if let Some(o) = j.output.as_mut() {
                if !o.eof_sent && o.fd.is_none() && o.buf.is_empty() {
                    // Tell the end of the archive only if it was complete.
                    match &j.result {
                        Some(Ok(())) => drain_out(*s, o, &mut budget, &mut frames),
                        Some(Err(_)) => o.eof_sent = true,
                        None => {}
                    }
                } else {
                    drain_out(*s, o, &mut budget, &mut frames);
                }
            }
            if let Some(i) = j.input.as_mut() {
                credit_in(*s, i, &mut frames);
            }
            let out_done = j.output.as_ref().is_none_or(|o| o.done() && o.eof_sent);
            if let Some(res) = &j.result
                && out_done
            {
                if !j.responded {
                    let r = match res {
                        Ok(()) => Response::Ok,
                        Err((k, m)) => Response::Error {
                            kind: *k,
                            message: m.clone(),
                        },
                    };
                    if let Ok(f) = proto::encode_json(Kind::Response, *s, &r) {
                        frames.push(f);
                    }
                }
                frames.push(proto::encode_close(*s));
                done_copies.push(*s);
            }
        }
        for s in done_copies {
            self.copies.remove(&s);
        }
        for f in frames {
            self.queue(f);
        }
        if self.outq_len() > 0 {
            // Try to write right away; poll will take over on EAGAIN.
            self.flush_some();
        }
    }
}
