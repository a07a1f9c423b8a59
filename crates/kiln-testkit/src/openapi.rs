//! Response bodies checked against an OpenAPI 3.1 document: the test
//! client fetches the server's own `/v1/openapi.json`, and every answer it
//! receives is validated (JSON Schema 2020-12, the `jsonschema` crate)
//! against the schema the document gives for that route, method and status.
//!
//! Invariants: a status the operation does not describe (nor a `default`
//! or `4XX`-style range) is an error, as is a JSON body where none is
//! described, a body that is not JSON where JSON is described, or a route
//! the document does not have. `$ref`s resolve to the document's
//! `components` (the schema is validated with the components beside it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// The compiled response schemas of one OpenAPI document.
pub struct ApiSchemas {
    doc: Value,
    cache: Mutex<HashMap<(String, String, String), Arc<jsonschema::Validator>>>,
}

impl ApiSchemas {
    /// From the document's JSON text.
    pub fn new(doc: &[u8]) -> Result<ApiSchemas> {
        let doc: Value = serde_json::from_slice(doc).context("the OpenAPI document is not JSON")?;
        if !doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1"))
        {
            bail!("not an OpenAPI 3.1 document");
        }
        if !doc["paths"].is_object() {
            bail!("the OpenAPI document has no paths");
        }
        Ok(ApiSchemas {
            doc,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The document's path template that `path` (query ignored) matches;
    /// a literal segment beats a `{param}`.
    pub fn route(&self, path: &str) -> Option<String> {
        let path = path.split('?').next().unwrap_or(path);
        let want: Vec<&str> = path.split('/').collect();
        let mut best: Option<(usize, &String)> = None;
        for tpl in self.doc["paths"].as_object()?.keys() {
            let segs: Vec<&str> = tpl.split('/').collect();
            if segs.len() != want.len() {
                continue;
            }
            let mut literal = 0;
            let fits = segs.iter().zip(&want).all(|(t, w)| {
                if t.starts_with('{') && t.ends_with('}') {
                    !w.is_empty()
                } else {
                    literal += 1;
                    t == w
                }
            });
            if fits && best.is_none_or(|(l, _)| literal > l) {
                best = Some((literal, tpl));
            }
        }
        best.map(|(_, t)| t.clone())
    }

    /// Whether the document has an operation for `method` on `path`.
    pub fn describes(&self, method: &str, path: &str) -> bool {
        self.route(path)
            .is_some_and(|r| self.doc["paths"][&r][method.to_ascii_lowercase()].is_object())
    }

    /// Checks one answer: `method` and `path` of the request, the status
    /// and body of the response.
    pub fn check(&self, method: &str, path: &str, status: u16, body: &[u8]) -> Result<()> {
        let route = self
            .route(path)
            .ok_or_else(|| anyhow!("{path}: no such route in the OpenAPI document"))?;
        let m = method.to_ascii_lowercase();
        let op = &self.doc["paths"][&route][&m];
        if !op.is_object() {
            bail!("{method} {route}: no such operation in the OpenAPI document");
        }
        let responses = &op["responses"];
        let code = status.to_string();
        let range = format!("{}XX", status / 100);
        let key = [code.as_str(), range.as_str(), "default"]
            .into_iter()
            .find(|k| responses[*k].is_object())
            .ok_or_else(|| anyhow!("{method} {route}: status {status} is not documented"))?;
        let described = &responses[key];
        let Some(schema) = described["content"]["application/json"]["schema"].as_object() else {
            if body.is_empty() {
                return Ok(());
            }
            bail!(
                "{method} {route} {status}: a body where none is documented: {}",
                String::from_utf8_lossy(body)
            );
        };
        let instance: Value = serde_json::from_slice(body).with_context(|| {
            format!(
                "{method} {route} {status}: the body is not JSON: {}",
                String::from_utf8_lossy(body)
            )
        })?;
        let validator = self.validator((route.clone(), m, key.to_owned()), schema)?;
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if !errors.is_empty() {
            bail!(
                "{method} {route} {status}: the body does not match its schema: {}\nbody: {instance}",
                errors.join("; ")
            );
        }
        Ok(())
    }

    fn validator(
        &self,
        key: (String, String, String),
        schema: &serde_json::Map<String, Value>,
    ) -> Result<Arc<jsonschema::Validator>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = cache.get(&key) {
            return Ok(v.clone());
        }
        // The response schema with the document's components beside it, so
        // `#/components/schemas/X` resolves inside this root.
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.doc["components"],
            "allOf": [Value::Object(schema.clone())],
        });
        let v = Arc::new(
            jsonschema::draft202012::new(&root)
                .map_err(|e| anyhow!("{key:?}: the schema does not compile: {e}"))?,
        );
        cache.insert(key, v.clone());
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> ApiSchemas {
        let d = json!({
            "openapi": "3.1.0",
            "paths": {
                "/v1/things/{id}": {"get": {"responses": {
                    "200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}},
                    "default": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Err"}}}}
                }}},
                "/v1/things/all": {"delete": {"responses": {"204": {"description": "gone"}}}}
            },
            "components": {"schemas": {
                "Thing": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}, "n": {"type": "integer", "minimum": 0}}},
                "Err": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object"}}}
            }}
        });
        ApiSchemas::new(d.to_string().as_bytes()).expect("doc")
    }

    #[test]
    fn matching_bodies_pass_and_others_fail() {
        let d = doc();
        assert_eq!(d.route("/v1/things/all").as_deref(), Some("/v1/things/all"));
        assert_eq!(
            d.route("/v1/things/x?y=1").as_deref(),
            Some("/v1/things/{id}")
        );
        d.check("GET", "/v1/things/a", 200, br#"{"id":"a","n":3}"#)
            .expect("valid");
        d.check("GET", "/v1/things/a", 503, br#"{"error":{}}"#)
            .expect("default");
        d.check("DELETE", "/v1/things/all", 204, b"")
            .expect("empty");
        for (m, p, s, b) in [
            ("GET", "/v1/things/a", 200, &br#"{"n":3}"#[..]),
            ("GET", "/v1/things/a", 200, br#"{"id":"a","n":-1}"#),
            ("GET", "/v1/things/a", 200, b"not json"),
            ("GET", "/v1/things/a", 404, br#"{"id":"a"}"#),
            ("DELETE", "/v1/things/all", 204, b"{}"),
            ("DELETE", "/v1/things/all", 200, b""),
            ("GET", "/v1/other", 200, b"{}"),
            ("PUT", "/v1/things/a", 200, b"{}"),
        ] {
            assert!(d.check(m, p, s, b).is_err(), "{m} {p} {s} passed");
        }
    }
}
