//! CEL expressions over a record, on top of the `cel` crate (the
//! cel-rust project's parser and interpreter; `cel-interpreter` was its name
//! until 0.10).
//!
//! Compiling parses the source and then walks the syntax tree for
//! identifiers: an identifier that is neither one of the record's variables
//! (`value`, `ts`, `metric`, `tags`, `quality`), nor a CEL type name, nor a
//! variable bound by a macro around it (`tags.exists(k, …)`) is a compile
//! error with its position. `cel` has no type checker, so a type error
//! (`value + 'a'`, a `filter` that is not boolean, an unknown function) is
//! found only at run time, on the record it fails on.
//!
//! Evaluation gives the interpreter a variable resolver that builds only the
//! variables the expression looks up, from the record it borrows.

use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr};
use cel::common::value::CowVal;
use cel::context::VariableResolver;
use cel::{Context, Env, IdedExpr, Program};

use crate::record::{Quality, Record, Value};

/// The variables a rule expression can use.
pub const VARIABLES: [&str; 5] = ["value", "ts", "metric", "tags", "quality"];

/// Identifiers CEL itself defines (type names usable as values).
const TYPE_NAMES: [&str; 10] = ["int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type"];

/// A syntax or reference error in one expression, at a 1-based line and
/// column (in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
    /// What is wrong.
    pub message: String,
}

/// Why evaluating an expression on a record failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// The interpreter failed (a type error, a missing key, division by zero…).
    #[error("{0}")]
    Execution(String),
    /// The result is not a number, bool or string (a list, a map, null…).
    #[error("result must be a number, bool or string, got {0}")]
    NotScalar(String),
    /// A `filter` or `alert.when` gave something other than a bool.
    #[error("result must be a bool, got {0}")]
    NotBool(&'static str),
}

/// A compiled CEL expression.
#[derive(Debug, Clone)]
pub struct Expression {
    source: String,
    program: Arc<Program>,
}

fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib()))
}

impl Expression {
    /// Parses `source` and checks its identifiers.
    pub fn compile(source: &str) -> Result<Expression, Vec<ExprError>> {
        let program = match env().compile(source) {
            Ok(p) => p,
            Err(errs) => {
                let mut out: Vec<ExprError> = errs
                    .errors
                    .iter()
                    .map(|e| ExprError {
                        line: u32::try_from(e.pos.0).unwrap_or(1).max(1),
                        column: u32::try_from(e.pos.1).unwrap_or(1).max(1),
                        message: e.msg.clone(),
                    })
                    .collect();
                if out.is_empty() {
                    out.push(ExprError { line: 1, column: 1, message: "invalid expression".into() });
                }
                return Err(out);
            }
        };
        let mut unknown = Vec::new();
        let mut scope = Vec::new();
        find_unknown(program.expression(), &mut scope, &mut unknown);
        if !unknown.is_empty() {
            let errors = unknown
                .into_iter()
                .map(|(id, name)| {
                    let offset = program.source_info().offset_for(id).map_or(0, |(start, _)| start as usize);
                    let (line, column) = line_column(source, offset);
                    ExprError {
                        line,
                        column,
                        message: format!(
                            "undeclared reference to '{name}' (variables: value, ts, metric, tags, quality)"
                        ),
                    }
                })
                .collect();
            return Err(errors);
        }
        Ok(Expression { source: source.to_string(), program: Arc::new(program) })
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression on `record`.
    pub fn eval(&self, record: &Record) -> Result<Value, EvalError> {
        let vars = RecordVars(record);
        let mut ctx = Context::with_env(Arc::clone(env()));
        ctx.set_variable_resolver(&vars);
        let out = self.program.execute(&ctx).map_err(|e| EvalError::Execution(e.to_string()))?;
        from_cel(out)
    }

    /// Evaluates a boolean expression (`filter`, `alert.when`) on `record`.
    pub fn eval_bool(&self, record: &Record) -> Result<bool, EvalError> {
        match self.eval(record)? {
            Value::Bool(b) => Ok(b),
            other => Err(EvalError::NotBool(other.type_name())),
        }
    }
}

/// Converts an interpreter result into a record value.
fn from_cel(v: cel::Value) -> Result<Value, EvalError> {
    match v {
        cel::Value::Int(i) => Ok(Value::I64(i)),
        cel::Value::UInt(u) => Ok(i64::try_from(u).map_or(Value::F64(u as f64), Value::I64)),
        cel::Value::Float(f) => Ok(Value::F64(f)),
        cel::Value::Bool(b) => Ok(Value::Bool(b)),
        cel::Value::String(s) => Ok(Value::Str(s.as_str().to_string())),
        cel::Value::Null => Err(EvalError::NotScalar("null".into())),
        cel::Value::List(_) => Err(EvalError::NotScalar("list".into())),
        cel::Value::Map(_) => Err(EvalError::NotScalar("map".into())),
        cel::Value::Bytes(_) => Err(EvalError::NotScalar("bytes".into())),
        other => Err(EvalError::NotScalar(format!("{:?}", other.type_of()))),
    }
}

fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::F64(x) => cel::Value::Float(*x),
        Value::I64(x) => cel::Value::Int(*x),
        Value::Bool(x) => cel::Value::Bool(*x),
        Value::Str(x) => cel::Value::String(Arc::new(x.clone())),
    }
}

/// The quality names as shared CEL strings (no allocation per record).
fn quality_name(q: Quality) -> Arc<String> {
    static NAMES: OnceLock<[Arc<String>; 3]> = OnceLock::new();
    let names =
        NAMES.get_or_init(|| [Quality::Good, Quality::Uncertain, Quality::Bad].map(|q| Arc::new(q.as_str().into())));
    Arc::clone(&names[q as usize])
}

/// Resolves the record's variables on demand.
struct RecordVars<'a>(&'a Record);

impl VariableResolver for RecordVars<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let r = self.0;
        let v = match variable {
            "value" => to_cel(&r.value),
            "ts" => cel::Value::Int(r.ts_ms),
            "metric" => cel::Value::String(Arc::new(r.metric.clone())),
            "quality" => cel::Value::String(quality_name(r.quality)),
            "tags" => {
                let map: std::collections::HashMap<String, String> =
                    r.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                cel::Value::from(map)
            }
            _ => return None,
        };
        v.try_into().ok().map(CowVal::Owned)
    }
}

/// Collects identifiers that are not variables, type names or bound by an
/// enclosing comprehension (macro): `(expression id, name)`.
fn find_unknown(e: &IdedExpr, scope: &mut Vec<String>, out: &mut Vec<(u64, String)>) {
    match &e.expr {
        Expr::Ident(name) => {
            let known = VARIABLES.contains(&name.as_str())
                || TYPE_NAMES.contains(&name.as_str())
                || scope.iter().any(|s| s == name);
            if !known && !out.iter().any(|(_, n)| n == name) {
                out.push((e.id, name.clone()));
            }
        }
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                find_unknown(t, scope, out);
            }
            for a in &c.args {
                find_unknown(a, scope, out);
            }
        }
        Expr::Comprehension(c) => {
            find_unknown(&c.iter_range, scope, out);
            find_unknown(&c.accu_init, scope, out);
            let depth = scope.len();
            scope.push(c.iter_var.clone());
            if let Some(v) = &c.iter_var2 {
                scope.push(v.clone());
            }
            scope.push(c.accu_var.clone());
            find_unknown(&c.loop_cond, scope, out);
            find_unknown(&c.loop_step, scope, out);
            find_unknown(&c.result, scope, out);
            scope.truncate(depth);
        }
        Expr::List(l) => {
            for x in &l.elements {
                find_unknown(x, scope, out);
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                match &entry.expr {
                    EntryExpr::MapEntry(me) => {
                        find_unknown(&me.key, scope, out);
                        find_unknown(&me.value, scope, out);
                    }
                    EntryExpr::StructField(sf) => find_unknown(&sf.value, scope, out),
                }
            }
        }
        Expr::Select(s) => find_unknown(&s.operand, scope, out),
        Expr::Struct(s) => {
            for entry in &s.entries {
                match &entry.expr {
                    EntryExpr::MapEntry(me) => {
                        find_unknown(&me.key, scope, out);
                        find_unknown(&me.value, scope, out);
                    }
                    EntryExpr::StructField(sf) => find_unknown(&sf.value, scope, out),
                }
            }
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// 1-based line and character column of a byte offset in `source`.
fn line_column(source: &str, offset: usize) -> (u32, u32) {
    let mut line = 1u32;
    let mut column = 1u32;
    for (i, ch) in source.char_indices() {
        if i >= offset {
            break;
        }
        if ch == '\n' {
            line = line.saturating_add(1);
            column = 1;
        } else {
            column = column.saturating_add(1);
        }
    }
    (line, column)
}
