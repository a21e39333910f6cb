//! What `--set KEY=VALUE` means: the type the key expects decides how VALUE is read. A text
//! key (strings, paths, names of choices) takes VALUE verbatim, newlines and YAML syntax
//! included; a number, bool, list or map key parses it as YAML; `null` clears an optional key
//! and is refused for one a run needs.
//!
//! The types are read off [`Recipe`]'s own `Deserialize` (a tracing deserializer walks it once),
//! so they cannot drift from the struct definitions.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::de::value::{Error, MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::Recipe;

/// Keys typed `Option` only because most presets have no value to default to, which no run can
/// do without: both mm-engine and MindSpeed-MM need a data set.
pub(super) const NEEDED_FOR_A_RUN: &[(&str, &str)] = &[("data.data_path", "data/train.jsonl")];

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A string, a path or one of named choices: VALUE verbatim.
    Text,
    Bool,
    Number,
    List,
    Map,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Shape {
    pub kind: Kind,
    /// `Option<_>`: `null` clears it.
    pub optional: bool,
}

/// Every key of the recipe (`train.lr`, `parallel`, …) with its shape.
pub(super) fn recipe_shapes() -> BTreeMap<String, Shape> {
    let out = RefCell::new(BTreeMap::new());
    Recipe::deserialize(Tracer { path: String::new(), optional: false, out: &out })
        .expect("the tracer feeds every field a value of its own type");
    out.into_inner()
}

/// Why `--set key=value` was refused: the message and a hint.
pub(super) type Refusal = (String, String);

/// VALUE as the JSON the key expects; `shape` None (a key the recipe does not have) keeps the
/// text, and the merge then refuses the key with a did-you-mean.
pub(super) fn set_value(key: &str, value: &str, shape: Option<Shape>) -> Result<Value, Refusal> {
    let Some(shape) = shape else {
        return Ok(Value::String(value.to_string()));
    };
    // `null`, and an empty value (YAML's null, as `--set key=` always meant), clear a key.
    if value.trim() == "null" || value.trim().is_empty() {
        if let Some((_, example)) = NEEDED_FOR_A_RUN.iter().find(|(k, _)| *k == key) {
            return Err((
                format!("`null` would clear `{key}`, which every run needs"),
                format!("give it a value, e.g. --set {key}={example}"),
            ));
        }
        if !shape.optional {
            return Err((format!("`{key}` cannot be null: it always holds {}", describe(shape.kind)), set_hint(key)));
        }
        return Ok(Value::Null);
    }
    Ok(match shape.kind {
        Kind::Text => Value::String(value.to_string()),
        // `6,8,8,6`, as mm-convert and mm-engine take a list of numbers (and as the layout
        // error suggests it), is the list `[6,8,8,6]`.
        Kind::List
            if !value.trim_start().starts_with('[') && (value.contains(',') || value.trim().parse::<f64>().is_ok()) =>
        {
            Value::Array(value.split(',').map(|item| set_item(item.trim())).collect())
        }
        // Not YAML: the deserializer then names the expected type.
        _ => serde_yaml_ng::from_str(value).unwrap_or_else(|_| Value::String(value.to_string())),
    })
}

/// One item of a comma-separated list: a number when it reads as one, else the text.
fn set_item(item: &str) -> Value {
    match serde_yaml_ng::from_str::<Value>(item) {
        Ok(v @ Value::Number(_)) => v,
        _ => Value::String(item.to_string()),
    }
}

fn describe(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "a string",
        Kind::Bool => "true or false",
        Kind::Number => "a number",
        Kind::List => "a list",
        Kind::Map => "a map of keys",
    }
}

fn set_hint(key: &str) -> String {
    format!("leave `--set {key}` out to keep the model's default")
}

/// A deserializer that feeds each field a placeholder of the type it asks for and records
/// what it asked for, under the field's key path.
struct Tracer<'a> {
    path: String,
    optional: bool,
    out: &'a RefCell<BTreeMap<String, Shape>>,
}

impl Tracer<'_> {
    fn record(&self, kind: Kind) {
        if !self.path.is_empty() {
            self.out.borrow_mut().insert(self.path.clone(), Shape { kind, optional: self.optional });
        }
    }
}

macro_rules! leaf {
    ($($method:ident => $kind:ident, $visit:ident($($value:expr)?);)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.record(Kind::$kind);
            visitor.$visit($($value)?)
        }
    )*};
}

impl<'de> Deserializer<'de> for Tracer<'_> {
    type Error = Error;

    leaf! {
        deserialize_any => Text, visit_unit();
        deserialize_bool => Bool, visit_bool(false);
        deserialize_i8 => Number, visit_i64(0);
        deserialize_i16 => Number, visit_i64(0);
        deserialize_i32 => Number, visit_i64(0);
        deserialize_i64 => Number, visit_i64(0);
        deserialize_u8 => Number, visit_u64(0);
        deserialize_u16 => Number, visit_u64(0);
        deserialize_u32 => Number, visit_u64(0);
        deserialize_u64 => Number, visit_u64(0);
        deserialize_f32 => Number, visit_f64(0.0);
        deserialize_f64 => Number, visit_f64(0.0);
        deserialize_char => Text, visit_char('x');
        deserialize_str => Text, visit_str("");
        deserialize_string => Text, visit_str("");
        deserialize_bytes => Text, visit_bytes(b"");
        deserialize_byte_buf => Text, visit_bytes(b"");
        deserialize_unit => Text, visit_unit();
        deserialize_identifier => Text, visit_str("");
        deserialize_ignored_any => Text, visit_unit();
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(Tracer { optional: true, ..self })
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.record(Kind::List);
        visitor.visit_seq(SeqDeserializer::new(std::iter::empty::<()>()))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.record(Kind::Map);
        visitor.visit_map(MapDeserializer::new(std::iter::empty::<((), ())>()))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.record(Kind::Map);
        visitor.visit_map(Fields { fields, next: 0, parent: self })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // Choices are written as their names: text.
        self.record(Kind::Text);
        let first: de::value::StrDeserializer<Error> = variants[0].into_deserializer();
        visitor.visit_enum(first)
    }
}

/// A struct's fields, each traced under its own key path.
struct Fields<'a> {
    fields: &'static [&'static str],
    next: usize,
    parent: Tracer<'a>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some(field) = self.fields.get(self.next) else {
            return Ok(None);
        };
        seed.deserialize(field.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let field = self.fields[self.next];
        self.next += 1;
        let path =
            if self.parent.path.is_empty() { field.to_string() } else { format!("{}.{field}", self.parent.path) };
        seed.deserialize(Tracer { path, optional: false, out: self.parent.out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_the_recipe_types() {
        let s = recipe_shapes();
        let shape = |k: &str| s.get(k).copied().unwrap_or_else(|| panic!("no shape for {k}"));
        let is = |kind, optional| Shape { kind, optional };
        assert_eq!(shape("model"), is(Kind::Text, false));
        assert_eq!(shape("train"), is(Kind::Map, false));
        assert_eq!(shape("train.lr"), is(Kind::Number, false));
        assert_eq!(shape("train.global_batch_size"), is(Kind::Number, true));
        assert_eq!(shape("train.vit_drop_path_rate"), is(Kind::Number, true));
        assert_eq!(shape("train.precision"), is(Kind::Text, false));
        assert_eq!(shape("train.freeze_vision"), is(Kind::Bool, false));
        assert_eq!(shape("parallel.llm_pp_layers"), is(Kind::List, true));
        assert_eq!(shape("parallel.context_parallel_algo"), is(Kind::Text, false));
        assert_eq!(shape("data.data_path"), is(Kind::Text, true));
        assert_eq!(shape("checkpoint.save_format"), is(Kind::Text, true));
        for (key, _) in NEEDED_FOR_A_RUN {
            assert!(s.contains_key(*key), "{key}");
        }
    }
}
