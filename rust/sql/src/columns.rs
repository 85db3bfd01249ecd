//! Where a statement's column references can carry values out of reach of column-based masking.
//!
//! Column masking rules are applied by the data path to result columns whose RowDescription names
//! a table and column (PostgreSQL fills those in only for a plain column reference, followed
//! through subqueries and CTEs). A value that comes out any other way (a cast that adds a node,
//! `coalesce(c, '')`, a set operation, a scalar subquery, a whole-row reference such as
//! `row_to_json(t)`, a column renamed by a subquery and used in an expression outside it, or data
//! copied into another relation by INSERT ... SELECT, CREATE TABLE AS or a view) reaches the client
//! with no table to match. This module lists those references so the control plane can refuse
//! statements that use a masked column that way:
//!
//! * `derived`: column references (as written, dotted) in positions whose value reaches the client
//!   or another relation without its origin: inside target-list expressions, as targets of set
//!   operation branches, scalar subqueries and renamed subqueries, in RETURNING, in the SET values of
//!   UPDATE, in the targets of a SELECT whose rows go into a relation;
//! * `whole_rows`: relations (by the name their alias stands for) referenced as a whole row
//!   (`t`, `t.*` other than as a top-level target, `*` where the rows go into a relation).
//!
//! References in WHERE, JOIN conditions, GROUP BY, HAVING, ORDER BY, LIMIT and window clauses only
//! filter and order rows when they are compared, sorted or grouped as they are; they are listed when
//! a function or a cast there takes them (`email::int = 1` prints the value in its error,
//! `pg_notify('c', email)` and `set_config('x', ssn, false)` send it elsewhere), but for a few pure
//! functions that cannot (`lower`, `length`, `count`, `max`, casts to text ...). The merged
//! columns of a FULL JOIN with USING or NATURAL are `COALESCE(l.c, r.c)` to PostgreSQL, with no
//! origin: references to them (and `*`) are listed. Names are as the parser folded them, without
//! catalog knowledge: the caller matches them against the column part of its rules, whatever the
//! table.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnRefs {
    pub derived: BTreeSet<String>,
    pub whole_rows: BTreeSet<String>,
}

/// How a SELECT's targets reach the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// The statement's own result: plain column targets keep their origin.
    Top,
    /// A subquery in FROM or a CTE without column names: plain targets keep their origin when
    /// they keep their name (the outer query refers to them by it).
    Nested,
    /// Targets lose their origin (set operation branches, scalar subqueries, renamed subqueries)
    /// or go into a relation: every column reference in them is listed.
    Derived,
}

/// The references of one statement's parse tree (the value under `stmt`).
pub fn column_refs(stmt: &Value) -> ColumnRefs {
    let mut w = Walker::default();
    collect_aliases(stmt, &mut w.aliases);
    let mut renamed = Vec::new();
    relations_in(stmt, &mut w.all_relations);
    collect_ranges(stmt, &mut w.ranges, &mut renamed);
    resolve_ranges(&mut w.ranges);
    // A column alias list (`customers c(i, n, e)`, `(a join b) j(x, y)`) renames a relation's
    // columns by position: without the catalog the new names cannot be traced to the masked
    // ones, so the relations behind it count as used whole.
    for rels in renamed {
        for rel in rels {
            let expanded = w.ranges.get(&rel).cloned().unwrap_or_default();
            w.refs.whole_rows.insert(rel);
            w.refs.whole_rows.extend(expanded);
        }
    }
    w.statement(stmt);
    w.refs
}

#[derive(Default)]
struct Walker {
    /// Range alias (or relation name) -> the relation names as written it stands for.
    aliases: BTreeMap<String, BTreeSet<String>>,
    /// Names of subqueries in FROM, CTEs, aliased joins and functions -> the relations read
    /// inside them (CTE names followed), so that a whole row of one is one of those relations.
    ranges: BTreeMap<String, BTreeSet<String>>,
    /// Every relation the statement names.
    all_relations: BTreeSet<String>,
    refs: ColumnRefs,
}

/// A RangeVar's relation as written (`schema.rel` or `rel`).
fn range_var_name(rv: &Value) -> String {
    let rel = rv.get("relname").and_then(Value::as_str).unwrap_or("");
    match rv.get("schemaname").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => format!("{s}.{rel}"),
        _ => rel.to_owned(),
    }
}

/// Every relation named (as a RangeVar) in `v`.
fn relations_in(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(map) => {
            if let Some(rv) = as_range_var(map, v) {
                out.insert(range_var_name(rv));
            }
            map.values().for_each(|c| relations_in(c, out));
        }
        Value::Array(items) => items.iter().for_each(|i| relations_in(i, out)),
        _ => {}
    }
}

fn has_colnames(alias: Option<&Value>) -> bool {
    alias
        .and_then(|a| a.get("colnames"))
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty())
}

/// Named ranges other than relations (see `Walker::ranges`), and the relations behind each
/// column alias list.
fn collect_ranges(
    v: &Value,
    ranges: &mut BTreeMap<String, BTreeSet<String>>,
    renamed: &mut Vec<BTreeSet<String>>,
) {
    match v {
        Value::Object(map) => {
            for (k, n) in map {
                let (name, body, alias): (Option<&str>, Vec<&Value>, Option<&Value>) =
                    match k.as_str() {
                        "RangeSubselect" | "RangeFunction" | "JoinExpr" => (
                            n.pointer("/alias/aliasname").and_then(Value::as_str),
                            vec![n],
                            n.get("alias"),
                        ),
                        "CommonTableExpr" => (
                            n.get("ctename").and_then(Value::as_str),
                            n.get("ctequery").into_iter().collect(),
                            None,
                        ),
                        "RangeVar" => (None, vec![], n.get("alias")),
                        _ => (None, vec![], None),
                    };
                if name.is_some() || has_colnames(alias) {
                    let mut rels = BTreeSet::new();
                    if k == "RangeVar" {
                        rels.insert(range_var_name(n));
                    }
                    body.iter().for_each(|b| relations_in(b, &mut rels));
                    if has_colnames(alias) && k != "RangeSubselect" && k != "RangeFunction" {
                        renamed.push(rels.clone());
                    }
                    if let Some(name) = name {
                        ranges.entry(name.to_owned()).or_default().extend(rels);
                    }
                }
                collect_ranges(n, ranges, renamed);
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|i| collect_ranges(i, ranges, renamed)),
        _ => {}
    }
}

/// Follows names of ranges read inside other ranges (a CTE read by a subquery), to a fixed point.
fn resolve_ranges(ranges: &mut BTreeMap<String, BTreeSet<String>>) {
    for _ in 0..16 {
        let mut changed = false;
        let snapshot = ranges.clone();
        for (name, rels) in ranges.iter_mut() {
            let more: Vec<String> = rels
                .iter()
                .filter(|r| *r != name)
                .filter_map(|r| snapshot.get(r))
                .flatten()
                .filter(|r| !rels.contains(*r))
                .cloned()
                .collect();
            if !more.is_empty() {
                changed = true;
                rels.extend(more);
            }
        }
        if !changed {
            break;
        }
    }
}

/// The RangeVar an object is or holds: `{"RangeVar": {...}}` in lists, the bare fields where a
/// node has a RangeVar field (UPDATE's, DELETE's and INSERT's target relation).
fn as_range_var<'a>(map: &'a serde_json::Map<String, Value>, v: &'a Value) -> Option<&'a Value> {
    map.get("RangeVar")
        .or_else(|| crate::analyze::is_range_var(map).then_some(v))
}

fn collect_aliases(v: &Value, out: &mut BTreeMap<String, BTreeSet<String>>) {
    match v {
        Value::Object(map) => {
            if let Some(rv) = as_range_var(map, v) {
                let rel = rv.get("relname").and_then(Value::as_str).unwrap_or("");
                let name = range_var_name(rv);
                let alias = rv
                    .pointer("/alias/aliasname")
                    .and_then(Value::as_str)
                    .unwrap_or(rel);
                // One alias may stand for different relations in different scopes
                // (`customers c ... exists (select 1 from t2 c)`): all of them.
                out.entry(alias.to_owned())
                    .or_default()
                    .insert(name.clone());
                // A whole row may be written with its schema (`public.customers.*`).
                out.entry(name.clone()).or_default().insert(name);
            }
            for child in map.values() {
                collect_aliases(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_aliases(i, out)),
        _ => {}
    }
}

/// How the targets of a subquery in FROM or a CTE reach the result: as the outer query's own
/// (`Nested`), unless a column list renames them or the outer query's rows lose their origin.
fn subquery_ctx(column_names: Option<&Value>, outer: Ctx) -> Ctx {
    let renamed = column_names
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if renamed || outer == Ctx::Derived {
        Ctx::Derived
    } else {
        Ctx::Nested
    }
}

/// The String fields of a ColumnRef, and whether it ends in `*`.
/// Functions that cannot carry a value out of a filter (no side effect, no error that prints it).
const PURE_FUNCTIONS: [&str; 19] = [
    "lower",
    "upper",
    "btrim",
    "ltrim",
    "rtrim",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "substr",
    "substring",
    "left",
    "right",
    "strpos",
    "position",
    "starts_with",
    "count",
    "min",
    "max",
];

/// Nodes in a filter that pass a column's value on as it is (compared, combined by `AND`/`OR`,
/// tested for NULL, sorted, grouped, or a subquery's own clauses).
const FILTER_NODES: [&str; 23] = [
    "A_Expr",
    "BoolExpr",
    "NullTest",
    "BooleanTest",
    "SortBy",
    "GroupingSet",
    "WindowDef",
    "SubLink",
    "SelectStmt",
    "CommonTableExpr",
    "ResTarget",
    "RangeVar",
    "JoinExpr",
    "RangeSubselect",
    "Alias",
    "A_Const",
    "ParamRef",
    "String",
    "Integer",
    "Float",
    "Boolean",
    "List",
    "A_Star",
];

/// Casts that cannot fail (so print nothing).
const TEXT_TYPES: [&str; 5] = ["text", "varchar", "bpchar", "name", "citext"];

/// The columns FULL JOINs with USING merge in `from` (as written), and whether one is NATURAL
/// (whose merged columns the catalog would name).
fn full_join_merged(from: Option<&Value>) -> (BTreeSet<String>, bool) {
    fn walk(v: &Value, merged: &mut BTreeSet<String>, natural: &mut bool) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| walk(i, merged, natural)),
            Value::Object(map) => {
                if let Some(j) = map.get("JoinExpr") {
                    if j.get("jointype").and_then(Value::as_str) == Some("JOIN_FULL") {
                        if j.get("isNatural").and_then(Value::as_bool) == Some(true) {
                            *natural = true;
                        }
                        merged.extend(
                            crate::analyze::strings(j.get("usingClause"))
                                .into_iter()
                                .map(str::to_owned),
                        );
                    }
                    for side in ["larg", "rarg"] {
                        if let Some(s) = j.get(side) {
                            walk(s, merged, natural);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut merged = BTreeSet::new();
    let mut natural = false;
    if let Some(f) = from {
        walk(f, &mut merged, &mut natural);
    }
    (merged, natural)
}

fn fields(cr: &Value) -> (Vec<String>, bool) {
    let mut names = Vec::new();
    let mut star = false;
    if let Some(Value::Array(items)) = cr.get("fields") {
        for f in items {
            if let Some(s) = f.pointer("/String/sval").and_then(Value::as_str) {
                names.push(s.to_owned());
            } else if f.get("A_Star").is_some() {
                star = true;
            }
        }
    }
    (names, star)
}

impl Walker {
    fn statement(&mut self, v: &Value) {
        let Some((key, n)) = v.as_object().and_then(|m| m.iter().next()) else {
            return;
        };
        match key.as_str() {
            "SelectStmt" => {
                let ctx = if n.get("intoClause").is_some_and(|i| !i.is_null()) {
                    Ctx::Derived // SELECT ... INTO: the rows go into a relation
                } else {
                    Ctx::Top
                };
                self.select(n, ctx);
            }
            // What these return is the inner query's result, as a SELECT's.
            "DeclareCursorStmt" | "PrepareStmt" | "ExplainStmt" => {
                if let Some(q) = n.get("query") {
                    self.statement(q);
                }
            }
            // Anything else: its SELECTs feed relations (INSERT ... SELECT, CREATE TABLE AS,
            // views, COPY (query)), its RETURNING and SET values reach the client or a relation.
            _ => self.other(n),
        }
    }

    fn other(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    match k.as_str() {
                        // ALTER COLUMN ... TYPE converts every value (and an error names one).
                        "AlterTableCmd"
                            if child.get("subtype").and_then(Value::as_str)
                                == Some("AT_AlterColumnType") =>
                        {
                            if let Some(col) = child.get("name").and_then(Value::as_str) {
                                self.refs.derived.insert(col.to_owned());
                            }
                            self.other(child);
                        }
                        "SelectStmt" => self.select(child, Ctx::Derived),
                        "whereClause" | "quals" | "joinCondition" => self.filter(child, false),
                        "ColumnRef" => self.reference(child, true),
                        _ => self.other(child),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| self.other(i)),
            _ => {}
        }
    }

    /// A SELECT (the object under `SelectStmt`, or a set operation branch).
    fn select(&mut self, n: &Value, ctx: Ctx) {
        if let Some(Value::Array(ctes)) = n.pointer("/withClause/ctes") {
            for c in ctes {
                let c = c.get("CommonTableExpr").unwrap_or(c);
                if let Some(q) = c.get("ctequery") {
                    self.query(q, subquery_ctx(c.get("aliascolnames"), ctx));
                }
            }
        }
        let setop = n
            .get("op")
            .and_then(Value::as_str)
            .is_some_and(|op| op != "SETOP_NONE");
        if setop {
            for side in ["larg", "rarg"] {
                if let Some(branch) = n.get(side) {
                    self.select(branch, Ctx::Derived);
                }
            }
            return;
        }
        let (merged, natural) = full_join_merged(n.get("fromClause"));
        if let Some(Value::Array(targets)) = n.get("targetList") {
            for t in targets {
                let t = t.get("ResTarget").unwrap_or(t);
                let Some(val) = t.get("val") else { continue };
                if let Some(cr) = val.get("ColumnRef") {
                    let (names, star) = fields(cr);
                    // A FULL JOIN's merged column: COALESCE of both sides, no origin.
                    if star && names.is_empty() && (natural || !merged.is_empty()) {
                        self.whole_row(None);
                        continue;
                    }
                    if !star && names.last().is_some_and(|c| merged.contains(c))
                        || (!star && natural && names.len() == 1)
                    {
                        self.refs.derived.insert(names.join("."));
                        continue;
                    }
                    let renamed = t
                        .get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|alias| Some(alias) != names.last().map(String::as_str));
                    let keeps_origin = match ctx {
                        Ctx::Top => true,
                        Ctx::Nested => !renamed,
                        Ctx::Derived => false,
                    };
                    if star {
                        if !keeps_origin {
                            self.star_row(&names);
                        }
                    } else if self.names_whole_row(&names) {
                        self.whole_row(Some(&names.join(".")));
                    } else if names.len() == 1 && self.is_range(&names[0]) {
                        self.whole_row(Some(&names[0]));
                    } else if !keeps_origin {
                        self.refs.derived.insert(names.join("."));
                    }
                } else {
                    self.expression(val);
                }
            }
        }
        if let Some(from) = n.get("fromClause") {
            self.from(from, ctx);
        }
        if let Some(values) = n.get("valuesLists") {
            self.expression(values);
        }
        // WHERE, GROUP BY, HAVING, ORDER BY, LIMIT, WINDOW: they filter and order (see `filter`).
        for clause in [
            "whereClause",
            "havingClause",
            "groupClause",
            "sortClause",
            "windowClause",
            "limitCount",
            "limitOffset",
            "distinctClause",
        ] {
            if let Some(c) = n.get(clause) {
                self.filter(c, false);
            }
        }
    }

    /// A clause that filters, orders or groups rows: a column compared, sorted or grouped as it is
    /// stays there, but one a function or a cast takes (`inside`) can come out in an error or a
    /// side effect, and is listed (whole rows too), unless the function is one that cannot.
    fn filter(&mut self, v: &Value, inside: bool) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    match k.as_str() {
                        "ColumnRef" => {
                            if inside {
                                self.reference(child, true);
                            }
                        }
                        "FuncCall" => {
                            let name = child
                                .get("funcname")
                                .and_then(Value::as_array)
                                .and_then(|n| n.last())
                                .and_then(|n| n.pointer("/String/sval"))
                                .and_then(Value::as_str)
                                .unwrap_or("");
                            self.filter(child, inside || !PURE_FUNCTIONS.contains(&name));
                        }
                        "TypeCast" => {
                            let names = crate::analyze::strings(child.pointer("/typeName/names"));
                            // `public.name` may be a domain whose CHECK runs code: the text types
                            // are pg_catalog's (written bare, they resolve there first).
                            let to = match names.as_slice() {
                                [t] | ["pg_catalog", t] => *t,
                                _ => "",
                            };
                            // `::text[]` parses the text as an array literal, and fails.
                            let array = child
                                .pointer("/typeName/arrayBounds")
                                .and_then(Value::as_array)
                                .is_some_and(|b| !b.is_empty());
                            self.filter(child, inside || array || !TEXT_TYPES.contains(&to));
                        }
                        // Nodes that compare, combine or hold values as they are.
                        k if FILTER_NODES.contains(&k) => self.filter(child, inside),
                        // Any other node (COALESCE, CASE, ROW, arrays, XML, JSON(...), IS JSON,
                        // what a newer grammar adds) may convert a value and print it: fail
                        // closed. Lower-case keys are fields of the node above.
                        k if k.starts_with(|c: char| c.is_ascii_uppercase()) => {
                            self.filter(child, true)
                        }
                        _ => self.filter(child, inside),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| self.filter(i, inside)),
            _ => {}
        }
    }

    /// A node holding a SELECT (`{"SelectStmt": ...}`).
    fn query(&mut self, q: &Value, ctx: Ctx) {
        if let Some(n) = q.get("SelectStmt") {
            self.select(n, ctx);
        } else {
            self.other(q);
        }
    }

    fn from(&mut self, v: &Value, ctx: Ctx) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| self.from(i, ctx)),
            Value::Object(map) => {
                if let Some(j) = map.get("JoinExpr") {
                    for side in ["larg", "rarg"] {
                        if let Some(s) = j.get(side) {
                            self.from(s, ctx);
                        }
                    }
                    if let Some(q) = j.get("quals") {
                        self.filter(q, false);
                    }
                } else if let Some(rs) = map.get("RangeSubselect") {
                    if let Some(q) = rs.get("subquery") {
                        self.query(q, subquery_ctx(rs.pointer("/alias/colnames"), ctx));
                    }
                } else if map.contains_key("RangeVar") {
                } else {
                    // Functions in FROM (unnest(array[c]), ...), table samples, XMLTABLE ...
                    self.expression(v);
                }
            }
            _ => {}
        }
    }

    /// An expression whose value reaches the result: every column reference in it is listed.
    fn expression(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    match k.as_str() {
                        "ColumnRef" => self.reference(child, true),
                        "SelectStmt" => self.select(child, Ctx::Derived),
                        _ => self.expression(child),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| self.expression(i)),
            _ => {}
        }
    }

    fn reference(&mut self, cr: &Value, derived: bool) {
        let (names, star) = fields(cr);
        if star {
            self.star_row(&names);
        } else if self.names_whole_row(&names) {
            self.whole_row(Some(&names.join(".")));
        } else if names.len() == 1 && self.is_range(&names[0]) {
            self.whole_row(Some(&names[0]));
        } else if derived && !names.is_empty() {
            self.refs.derived.insert(names.join("."));
        }
    }

    /// `q.*` (`c.*`, `public.customers.*`, `app.public.customers.*`; a bare `*`: None) as a whole
    /// row of what `q` stands for.
    fn star_row(&mut self, qualifier: &[String]) {
        if qualifier.is_empty() {
            self.whole_row(None);
        } else {
            self.whole_row(Some(&qualifier.join(".")));
            if qualifier.len() > 1 {
                // `app.public.customers.*`: the relation as the FROM clause may name it.
                let tail = qualifier[qualifier.len() - 2..].join(".");
                self.whole_row(Some(&tail));
                self.whole_row(qualifier.last().map(String::as_str));
            }
        }
    }

    /// `public.customers` (and `app.public.customers`) as a whole row: a qualified name that is a
    /// relation of the statement, not a column of one.
    fn names_whole_row(&self, names: &[String]) -> bool {
        names.len() >= 2
            && (self.aliases.contains_key(&names.join("."))
                || (!self.aliases.contains_key(&names[0])
                    && names.last().is_some_and(|l| self.aliases.contains_key(l))))
    }

    /// Whether a bare name is a range of the statement (a relation, subquery, CTE, join or
    /// function alias), which PostgreSQL may read as a whole row.
    fn is_range(&self, name: &str) -> bool {
        self.aliases.contains_key(name) || self.ranges.contains_key(name)
    }

    /// `alias` (None: a bare `*`) as a whole row: the relation it stands for (and, for a
    /// subquery, CTE, join or function, every relation read inside it), `*` for every one.
    fn whole_row(&mut self, alias: Option<&str>) {
        let Some(a) = alias else {
            self.refs.whole_rows.insert("*".to_owned());
            return;
        };
        let rels = self
            .aliases
            .get(a)
            .cloned()
            .unwrap_or_else(|| BTreeSet::from([a.to_owned()]));
        if rels.iter().any(|r| self.ranges.contains_key(r)) || self.ranges.contains_key(a) {
            // A subquery, CTE, join or function: what it returns may come from any relation of
            // the statement (a LATERAL subquery selects the outer query's columns), so all count.
            self.refs
                .whole_rows
                .extend(self.all_relations.iter().cloned());
        }
        self.refs.whole_rows.extend(rels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(sql: &str) -> ColumnRefs {
        let json = crate::ffi::parse_json(sql).unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        column_refs(v.pointer("/stmts/0/stmt").unwrap())
    }

    fn derived(sql: &str) -> Vec<String> {
        refs(sql).derived.into_iter().collect()
    }

    fn whole(sql: &str) -> Vec<String> {
        refs(sql).whole_rows.into_iter().collect()
    }

    #[test]
    fn plain_columns_keep_their_origin() {
        for sql in [
            "select name, c.ssn as s from customers c where ssn like '1%' order by name",
            "select * from customers",
            "select c.* from customers c",
            "select name from (select name from customers) s",
            "with x as (select name, id from customers) select x.name from x where id = 1",
            "select distinct name from customers group by name having count(ssn) > 1",
            "declare c cursor for select name from customers",
            "select name from customers where id in (select id from t where ssn = 'x')",
            "select name from customers where lower(email) = lower('A') and ssn::text like '1%'",
            "select name from customers c join t on t.ssn = c.ssn order by ssn, length(email)",
            "select name from customers left join t using (ssn)",
            "update t set x = 1 where ssn = '1'",
        ] {
            let r = refs(sql);
            assert!(
                r.derived.is_empty() && r.whole_rows.is_empty(),
                "{sql}: {r:?}"
            );
        }
    }

    #[test]
    fn values_computed_from_columns_are_listed() {
        assert_eq!(derived("select name::varchar from customers"), ["name"]);
        // Without the catalog a cast is a cast (PostgreSQL drops one to the column's own type and
        // keeps the origin; listed anyway).
        assert_eq!(derived("select name::text from customers"), ["name"]);
        assert_eq!(
            derived("select coalesce(c.name, '') from customers c"),
            ["c.name"]
        );
        assert_eq!(
            derived("select name collate \"C\" from customers"),
            ["name"]
        );
        assert_eq!(
            derived("select (select name from customers limit 1)"),
            ["name"]
        );
        assert_eq!(
            derived("select secretcol from customers union all select 'x'"),
            ["secretcol"]
        );
        assert_eq!(
            derived("select array_agg(secretcol) from customers"),
            ["secretcol"]
        );
        assert_eq!(
            derived("select n from (select name as n from customers) s"),
            ["name"]
        );
        assert_eq!(
            derived("select coalesce(w, '') from (select name from customers) s(w)"),
            ["name", "w"]
        );
        assert_eq!(
            derived("with x(n) as (select name from customers) select n from x"),
            ["name"]
        );
        assert_eq!(
            derived("delete from customers where id = 1 returning ssn"),
            ["ssn"]
        );
        assert_eq!(derived("update t set other = ssn where id = 1"), ["ssn"]);
        assert_eq!(derived("insert into t2 select ssn from customers"), ["ssn"]);
        assert_eq!(
            derived("create table t2 as select ssn from customers"),
            ["ssn"]
        );
        assert_eq!(
            derived("create view v as select ssn from customers"),
            ["ssn"]
        );
        assert_eq!(derived("select ssn into t2 from customers"), ["ssn"]);
        assert_eq!(
            derived("select u from unnest(array[(select ssn from c)]) u"),
            ["ssn"]
        );
    }

    #[test]
    fn functions_and_casts_in_filters_are_listed() {
        assert_eq!(
            derived("select name from customers where email::int = 1"),
            ["email"]
        );
        assert_eq!(
            derived("select name from customers order by ssn::int"),
            ["ssn"]
        );
        assert_eq!(
            derived("select name from customers c join t on t.id = c.card::int"),
            ["c.card"]
        );
        assert_eq!(
            derived("select name from customers where pg_notify('c', email || ssn) is null"),
            ["email", "ssn"]
        );
        assert_eq!(
            derived("select 1 from customers where set_config('x', ssn, false) is not null"),
            ["ssn"]
        );
        assert_eq!(
            derived("select 1 from t where exists (select pg_notify('c', email) from customers)"),
            ["email"]
        );
        assert_eq!(
            derived("delete from t where coalesce(ssn, '')::int = 1"),
            ["ssn"]
        );
        assert_eq!(
            whole("select 1 from t where row_to_json(t)::text::int = 1"),
            ["t"]
        );
        // A cast to an array of text parses the value as an array literal (and prints it).
        assert_eq!(
            derived("select id from customers where secret::text[] is null"),
            ["secret"]
        );
        assert_eq!(
            derived("select id from customers order by cast(ssn as varchar array)"),
            ["ssn"]
        );
        // Nodes the walk does not know as harmless take what is under them: JSON(...) is a
        // cast to json in PostgreSQL 15, a JsonParseExpr to the parser.
        assert_eq!(
            derived("select id from customers where json('\"' || secret) is null"),
            ["secret"]
        );
        assert_eq!(
            derived("select id from customers where secret is json"),
            ["secret"]
        );
        // Comparisons, text casts and subqueries' own columns stay unlisted.
        assert!(derived(
            "select id from customers where secret::text = 'x' and id in \
             (with w as (select id from t) select id from w)"
        )
        .is_empty());
    }

    #[test]
    fn column_alias_lists_count_as_whole_rows() {
        // `c(i, n, x)` renames the columns by position: `x || ''` would be the masked one.
        assert_eq!(
            whole("select x || '' from customers as c(i, n, x)"),
            ["customers"]
        );
        assert_eq!(
            whole("select j.x || '' from (customers c join other o on true) as j(i, x)"),
            ["customers", "other"]
        );
        assert_eq!(
            whole("with w as (select * from s.customers) select x || '' from w as v(i, x)"),
            ["s.customers", "w"]
        );
        // Functions and VALUES lists are named with column lists all the time: no relation.
        assert!(whole("select n from generate_series(1, 3) g(n)").is_empty());
        assert!(whole("select a from (values (1)) v(a)").is_empty());
    }

    #[test]
    fn whole_rows_found_by_a_second_round() {
        // A LATERAL subquery selects the outer query's columns: its whole row is any relation's.
        assert!(
            whole("select l from customers c, lateral (select c.secret) l")
                .contains(&"customers".to_owned())
        );
        // The same alias for another relation in another scope.
        assert!(
            whole("select c from customers c where exists (select 1 from t2 c)")
                .contains(&"customers".to_owned())
        );
        // Whole rows written with their schema.
        assert!(whole("select (public.customers.*)::text from customers")
            .contains(&"customers".to_owned()));
        assert!(
            whole("select row_to_json(public.customers.*) from public.customers")
                .contains(&"public.customers".to_owned())
        );
        assert!(whole("select public.customers from public.customers")
            .contains(&"public.customers".to_owned()));
        // The target of UPDATE/DELETE/INSERT as a whole row, in RETURNING and SET.
        for sql in [
            "update customers set name = name where id = 1 returning customers",
            "update customers c set name = name returning c",
            "delete from customers where id = 2 returning customers",
            "update customers set name = customers::text where id = 1",
            "insert into customers values (1) on conflict (id) do update set name = customers::text",
        ] {
            assert!(whole(sql).contains(&"customers".to_owned()), "{sql}");
        }
        // Casts to a text type of another schema (a domain with a CHECK) are not harmless.
        assert_eq!(
            derived("select id from customers where secret::public.name is not null"),
            ["secret"]
        );
        assert!(derived("select id from customers where secret::pg_catalog.text = 'x'").is_empty());
        // ALTER COLUMN ... TYPE converts every value of the column.
        assert_eq!(
            derived("alter table customers alter column secret type regclass"),
            ["secret"]
        );
    }

    #[test]
    fn whole_rows_of_subqueries_ctes_and_joins_are_their_relations() {
        assert_eq!(
            whole("select s from (select secret, ssn from customers) s"),
            ["customers", "s"]
        );
        assert_eq!(
            whole("select row_to_json(s) from (select secret from customers) s"),
            ["customers", "s"]
        );
        assert_eq!(
            whole("select (s).secret || '' from (select secret from customers) s"),
            ["customers", "s"]
        );
        assert_eq!(
            whole("with w as (select secret from customers) select w from w"),
            ["customers", "w"]
        );
        assert_eq!(
            whole(
                "with a as (select secret from customers), b as (select * from a) \
                 select to_jsonb(b) from b"
            ),
            ["a", "b", "customers"]
        );
        assert_eq!(
            whole("select j from (customers join other using (id)) j"),
            ["customers", "j", "other"]
        );
        assert_eq!(whole("select s from (select 1) s"), ["s"]);
        // Plain columns of a subquery keep their origin.
        assert!(whole("select s.secret from (select secret from customers) s").is_empty());
    }

    #[test]
    fn merged_columns_of_full_joins_are_listed() {
        assert_eq!(
            derived("select email from customers full join (select null::text as email) s using (email)"),
            ["email"]
        );
        assert_eq!(
            derived("select ssn from customers natural full join t"),
            ["ssn"]
        );
        assert_eq!(whole("select * from customers natural full join t"), ["*"]);
        assert!(derived("select email from customers left join t using (email)").is_empty());
    }

    #[test]
    fn whole_rows_are_listed_by_relation() {
        assert_eq!(whole("select c from customers c"), ["customers"]);
        assert_eq!(
            whole("select row_to_json(m) from mask_people m"),
            ["mask_people"]
        );
        assert_eq!(
            whole("select row_to_json(m.*) from s.mask_people m"),
            ["s.mask_people"]
        );
        assert_eq!(whole("select json_agg(c) from customers c"), ["customers"]);
        assert_eq!(whole("select customers from customers"), ["customers"]);
        assert_eq!(
            whole("select * from customers union select * from customers"),
            ["*"]
        );
        assert_eq!(whole("create table t2 as select * from customers"), ["*"]);
        assert!(whole("select c.* from customers c").is_empty());
    }
}
