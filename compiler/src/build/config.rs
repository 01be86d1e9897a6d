//! Binding the `config` section to a checkpoint's config.json: each declared key is read
//! with its type, or falls back to its default (an expression of earlier keys), or is an
//! error naming the key, where it is declared and what was expected.
use super::{Builder, Value, R};
use crate::dsl::{ConfigKey, ValueKind};
use serde_json::Value as Json;

impl Builder<'_> {
    pub(super) fn bind_config(&mut self, hf: &Json) -> R<()> {
        let empty = serde_json::Map::new();
        let obj = hf.as_object().unwrap_or(&empty);
        for key in &self.def.config {
            // As in HF's config classes: an explicit `null` is None for an optional key
            // (`"sliding_window": null` turns the window off even though the default is
            // 4096) and "use the default" for a required one (`head_dim: null`).
            let raw = obj.get(&key.name);
            if key.optional && raw.is_some_and(Json::is_null) {
                self.config.insert(key.name.clone(), Json::Null);
                self.env.insert(key.name.clone(), Value::Null);
                continue;
            }
            let v = match raw.filter(|v| !v.is_null()) {
                Some(j) => {
                    let v = Value::from_json(j);
                    self.check_kind(key, v).map_err(|got| {
                        self.err(
                            key.ty_span,
                            format!(
                                "config.json has `\"{}\": {}`, but the model file declares it `{}`",
                                key.name,
                                got.show(),
                                type_name(key)
                            ),
                        )
                        .note(format!("expected {} in config.json", kind_phrase(key.kind)))
                    })?
                }
                None => match &key.default {
                    Some(e) => {
                        let v = self.eval(e)?;
                        if v == Value::Null && key.optional {
                            Value::Null
                        } else {
                            self.check_kind(key, v).map_err(|got| {
                                self.err(
                                    e.span,
                                    format!(
                                        "the default of `{}` is {}, but its type is `{}`",
                                        key.name,
                                        got.show(),
                                        type_name(key)
                                    ),
                                )
                            })?
                        }
                    }
                    None if key.optional => Value::Null,
                    None => {
                        return Err(self
                            .err(
                                key.span,
                                format!(
                                "config.json has no `{}`, and the model file gives it no default",
                                key.name
                            ),
                            )
                            .note(format!(
                                "expected {} `{}` in config.json, or a default here (`{}: {} = …`)",
                                kind_phrase(key.kind),
                                key.name,
                                key.name,
                                type_name(key)
                            )))
                    }
                },
            };
            self.config.insert(key.name.clone(), v.to_json());
            self.env.insert(key.name.clone(), v);
        }
        Ok(())
    }

    /// The value converted to the declared kind, or the offending value back.
    fn check_kind(&self, key: &ConfigKey, v: Value) -> Result<Value, Value> {
        let ok = match (key.kind, &v) {
            (ValueKind::Int, x) => x.as_i64().map(Value::Int),
            (ValueKind::Float, x) => x.as_f64().map(Value::Float),
            (ValueKind::Bool, Value::Bool(_))
            | (ValueKind::Str, Value::Str(_))
            | (ValueKind::Dict, Value::Dict(_))
            | (ValueKind::List, Value::List(_)) => Some(v.clone()),
            _ => None,
        };
        ok.ok_or(v)
    }
}

fn type_name(key: &ConfigKey) -> String {
    format!("{}{}", key.kind.name(), if key.optional { "?" } else { "" })
}

fn kind_phrase(k: ValueKind) -> &'static str {
    match k {
        ValueKind::Int => "an integer",
        ValueKind::Float => "a number",
        ValueKind::Bool => "true or false",
        ValueKind::Str => "a string",
        ValueKind::Dict => "an object",
        ValueKind::List => "a list",
    }
}
