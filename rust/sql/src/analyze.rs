//! What a statement does, judged by PostgreSQL's own parser (libpg_query, through the pg_query
//! crate): the kinds of every (sub-)statement, the relations read and written, the functions
//! called, UPDATE/DELETE without WHERE, and effects that no kind names (COPY PROGRAM, SET ROLE,
//! leaving read-only mode, server files, remote connections, server control).
//!
//! Theory of operation. libpg_query returns the parse tree as JSON (`ffi::parse_json`, about three
//! times cheaper than the crate's protobuf route), which is read into a generic value and walked
//! *completely*: every object whose key names a node type is classified wherever it appears (inside a CTE, a subquery, an array, a
//! function argument, EXPLAIN ANALYZE, PREPARE, CREATE RULE ...), so nothing hides in a position a
//! hand-written walker forgot. Relations are found by shape (an object with `relname` and
//! `relpersistence`); the
//! targets of writes are recorded as written, every other relation as read. Judged by effect:
//! `WITH x AS (DELETE ...) SELECT` has kinds {select, delete}; EXPLAIN without ANALYZE runs
//! nothing, so it is {explain} with the inner statement's relations as reads; EXPLAIN ANALYZE keeps
//! the inner kinds. Text that does not parse is an error: the caller denies it (fail closed).

use std::collections::BTreeSet;

use serde_json::Value;

/// One statement of a (possibly multi-statement) string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Statement {
    /// Byte offset and length of the statement in the analysed text.
    pub start: usize,
    pub len: usize,
    pub kinds: BTreeSet<&'static str>,
    pub reads: BTreeSet<String>,
    pub writes: BTreeSet<String>,
    pub functions: BTreeSet<String>,
    /// An UPDATE or DELETE without WHERE (every row).
    pub unbounded_write: bool,
    pub effects: BTreeSet<&'static str>,
    /// Whether constant values took part in the judgement (SET values, set_config arguments,
    /// option values): then a verdict holds for this text only, not for its shape.
    pub literal_sensitive: bool,
    /// Column references whose values leave without their origin, and relations referenced as
    /// whole rows (`crate::columns`): what column masking rules cannot follow.
    pub columns: crate::columns::ColumnRefs,
}

/// Why a text could not be analysed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnalyzeError {
    #[error("the statement does not parse: {0}")]
    Parse(String),
    #[error("the parse tree could not be read: {0}")]
    Tree(String),
}

/// Analyses every statement of `sql`.
pub fn analyze(sql: &str) -> Result<Vec<Statement>, AnalyzeError> {
    let json = crate::ffi::parse_json(sql).map_err(AnalyzeError::Parse)?;
    let parsed: Value =
        serde_json::from_str(&json).map_err(|e| AnalyzeError::Tree(e.to_string()))?;
    let mut out = Vec::new();
    let no_statements = Vec::new();
    let stmts = parsed
        .get("stmts")
        .and_then(Value::as_array)
        .unwrap_or(&no_statements);
    for raw in stmts {
        let tree = raw.get("stmt").unwrap_or(&Value::Null);
        let at = |key: &str| {
            raw.get(key)
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
        };
        let start = at("stmt_location").unwrap_or(0).min(sql.len());
        let len = match at("stmt_len") {
            None | Some(0) => sql.len() - start,
            Some(n) => n.min(sql.len() - start),
        };
        let mut st = Statement {
            start,
            len,
            ..Statement::default()
        };
        let mut walk = Walk::default();
        walk.value(tree, &mut st);
        st.columns = crate::columns::column_refs(tree);
        for (rel, target) in walk.relations {
            if target && matches!(rel.as_str(), "pg_settings" | "pg_catalog.pg_settings") {
                // UPDATE pg_settings is set_config (of the setting its WHERE names): judged as a
                // set_config of any setting.
                st.effects.extend([
                    "config-change",
                    "read-only-change",
                    "lexer-change",
                    "search-path-change",
                    "role-change",
                ]);
            }
            if target {
                st.writes.insert(rel);
            } else {
                st.reads.insert(rel);
            }
        }
        if st.kinds.is_empty() {
            st.kinds.insert("utility");
        }
        out.push(st);
    }
    Ok(out)
}

#[derive(Default)]
struct Walk {
    /// (relation, written?) in the order found.
    relations: Vec<(String, bool)>,
    /// Relation objects that are write targets (by address), so the generic walk skips them.
    targets: Vec<*const Value>,
    /// The WITH queries in scope where the walk is (innermost last): an unqualified name that is
    /// one of them reads the CTE, not a relation. Scoped as PostgreSQL scopes them: a WITH's names
    /// hold in its statement and, in a non-recursive WITH, in the CTEs after each one only (in
    /// its own query, a CTE's name is the relation's), and never for a write target.
    ctes: Vec<Vec<String>>,
    /// The VALUES lists INSERTs take their rows from (by address): not a SELECT.
    values_sources: Vec<*const Value>,
    /// In `SELECT set_config(name, ...) FROM pg_settings WHERE name = 'x'` (pg_dump's form), the
    /// setting `name` stands for: set by the SELECT being walked.
    settings_row: Option<String>,
}

/// Whether a JSON object is a RangeVar's fields (under a `RangeVar` key in lists, bare where a
/// node's field is one: UPDATE's, DELETE's and INSERT's target).
pub(crate) fn is_range_var(map: &serde_json::Map<String, Value>) -> bool {
    map.contains_key("relname") && map.contains_key("relpersistence")
}

/// The setting a `SELECT ... FROM pg_settings WHERE name = '<constant>'` reads, if it is one.
fn pg_settings_row(select: &Value) -> Option<String> {
    let from = select.get("fromClause")?.as_array()?;
    let [item] = from.as_slice() else { return None };
    let rv = item.get("RangeVar")?;
    let schema = rv
        .get("schemaname")
        .and_then(Value::as_str)
        .unwrap_or("pg_catalog");
    if rv.get("relname").and_then(Value::as_str) != Some("pg_settings") || schema != "pg_catalog" {
        return None;
    }
    let e = select.pointer("/whereClause/A_Expr")?;
    if e.get("kind").and_then(Value::as_str) != Some("AEXPR_OP") || strings(e.get("name")) != ["="]
    {
        return None;
    }
    fn is_name(v: Option<&Value>) -> bool {
        v.and_then(|c| c.get("ColumnRef"))
            .is_some_and(|c| strings(c.get("fields")) == ["name"])
    }
    fn constant(v: Option<&Value>) -> Option<String> {
        v.and_then(|c| c.pointer("/A_Const/sval/sval"))
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
    }
    let (l, r) = (e.get("lexpr"), e.get("rexpr"));
    if is_name(l) {
        constant(r)
    } else if is_name(r) {
        constant(l)
    } else {
        None
    }
}

impl Walk {
    fn value(&mut self, v: &Value, st: &mut Statement) {
        match v {
            Value::Object(map) => {
                if is_range_var(map) {
                    let qualified = ["schemaname", "catalogname"].iter().any(|k| {
                        v.get(k)
                            .and_then(Value::as_str)
                            .is_some_and(|s| !s.is_empty())
                    });
                    let name = relation_name(v);
                    let cte = !qualified && self.ctes.iter().any(|scope| scope.contains(&name));
                    // Catalog views that publish sampled values of other relations' columns.
                    if matches!(
                        v.get("relname").and_then(Value::as_str),
                        Some(
                            "pg_stats"
                                | "pg_stats_ext"
                                | "pg_stats_ext_exprs"
                                | "pg_statistic"
                                | "pg_statistic_ext_data"
                        )
                    ) {
                        st.effects.insert("dynamic-sql");
                    }
                    // Views of the server's configuration files.
                    if matches!(
                        v.get("relname").and_then(Value::as_str),
                        Some("pg_hba_file_rules" | "pg_ident_file_mappings" | "pg_file_settings")
                    ) {
                        st.effects.insert("server-files");
                    }
                    if !cte && !self.targets.contains(&(v as *const Value)) {
                        self.relations.push((name, false));
                    }
                    return;
                }
                // A statement's fields with a WITH: its CTEs' names hold while the rest is walked.
                let with = map
                    .get("withClause")
                    .and_then(|w| w.get("WithClause").or(Some(w)))
                    .filter(|w| w.is_object());
                let names: Vec<String> = with
                    .and_then(|w| w.get("ctes"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| {
                        let c = c.get("CommonTableExpr").unwrap_or(c);
                        c.get("ctename").and_then(Value::as_str).map(str::to_owned)
                    })
                    .collect();
                let recursive = with.is_some_and(|w| flag(w, "recursive"));
                for (key, child) in map {
                    if key == "withClause" && !names.is_empty() {
                        // Each CTE sees those before it (all of them, itself too, if RECURSIVE).
                        let ctes = with
                            .and_then(|w| w.get("ctes"))
                            .and_then(Value::as_array)
                            .map(Vec::as_slice)
                            .unwrap_or_default();
                        for (i, cte) in ctes.iter().enumerate() {
                            let seen = if recursive { names.len() } else { i };
                            self.ctes.push(names[..seen.min(names.len())].to_vec());
                            self.value(cte, st);
                            self.ctes.pop();
                        }
                        continue;
                    }
                    if !names.is_empty() {
                        self.ctes.push(names.clone());
                    }
                    // Node types are capitalised (`SelectStmt`); field names are not.
                    let is_node = key.as_bytes().first().is_some_and(u8::is_ascii_uppercase);
                    if !is_node || self.node(key, child, st) {
                        self.value(child, st);
                    }
                    if !names.is_empty() {
                        self.ctes.pop();
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.value(item, st);
                }
            }
            _ => {}
        }
    }

    fn target(&mut self, rel: Option<&Value>) {
        if let Some(r) = rel.filter(|r| r.is_object()) {
            self.targets.push(r as *const Value);
            self.relations.push((relation_name(r), true));
        }
    }

    /// Classifies one node (its type name and fields) before its children are walked; false when
    /// the children were dealt with here.
    fn node(&mut self, key: &str, n: &Value, st: &mut Statement) -> bool {
        if matches!(
            key,
            "VariableSetStmt" | "TransactionStmt" | "ExplainStmt" | "CopyStmt"
        ) {
            st.literal_sensitive = true;
        }
        if matches!(
            key,
            "AlterDatabaseSetStmt" | "AlterRoleSetStmt" | "AlterSystemStmt"
        ) {
            // A SET that later sessions start with: judged as that SET (role, search_path,
            // read-only, lexer settings), on top of what the ALTER itself is.
            if let Some(set) = n.get("setstmt").filter(|v| v.is_object()) {
                set_effects(set, st);
                st.literal_sensitive = true;
            }
        }
        for name in named_wholesale(key, n) {
            self.relations.push((name, true));
        }
        let kinds = &mut st.kinds;
        match key {
            // The VALUES list an INSERT takes its rows from reads nothing (a subquery inside it
            // is a SelectStmt of its own and counts).
            "SelectStmt" | "SetOperationStmt"
                if !self.values_sources.contains(&(n as *const Value)) =>
            {
                kinds.insert("select");
                self.settings_row = pg_settings_row(n);
                // FOR UPDATE / SHARE: row locks that hold other writers (refused when read-only).
                if n.get("lockingClause")
                    .and_then(Value::as_array)
                    .is_some_and(|l| !l.is_empty())
                {
                    st.effects.insert("row-lock");
                }
                // SELECT ... INTO t creates t, as CREATE TABLE t AS does.
                if let Some(into) = n.get("intoClause").filter(|i| i.is_object()) {
                    let into = into.get("IntoClause").unwrap_or(into);
                    kinds.insert("create");
                    self.target(into.get("rel"));
                }
            }
            "InsertStmt" => {
                kinds.insert("insert");
                self.target(n.get("relation"));
                if let Some(src) = n.get("selectStmt").and_then(|s| s.get("SelectStmt")) {
                    if src
                        .get("valuesLists")
                        .and_then(Value::as_array)
                        .is_some_and(|v| !v.is_empty())
                    {
                        self.values_sources.push(src as *const Value);
                    }
                }
                // ON CONFLICT DO UPDATE changes rows that exist: PostgreSQL wants the UPDATE
                // privilege for it, and rules on updates (approvals, statement kinds) see it.
                if n.get("onConflictClause")
                    .and_then(|c| c.get("action"))
                    .and_then(Value::as_str)
                    == Some("ONCONFLICT_UPDATE")
                {
                    kinds.insert("update");
                }
            }
            "UpdateStmt" | "DeleteStmt" => {
                kinds.insert(if key == "UpdateStmt" {
                    "update"
                } else {
                    "delete"
                });
                self.target(n.get("relation"));
                if n.get("whereClause").is_none_or(Value::is_null) {
                    st.unbounded_write = true;
                }
            }
            "MergeStmt" => {
                kinds.insert("merge");
                self.target(n.get("relation"));
                // Each action counts as what it does (as PostgreSQL checks the INSERT, UPDATE and
                // DELETE privileges MERGE's actions need): a rule on updates holds a MERGE that
                // updates.
                for c in n
                    .get("mergeWhenClauses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let c = c.get("MergeWhenClause").unwrap_or(c);
                    match c.get("commandType").and_then(Value::as_str) {
                        Some("CMD_UPDATE") => {
                            kinds.insert("update");
                        }
                        Some("CMD_DELETE") => {
                            kinds.insert("delete");
                        }
                        Some("CMD_INSERT") => {
                            kinds.insert("insert");
                        }
                        _ => {}
                    }
                }
                // WHEN MATCHED THEN UPDATE/DELETE joined on a condition that names no column
                // (ON true, ON 1 = 1): every row of the target, as an UPDATE or DELETE without WHERE.
                let matched_write = n
                    .get("mergeWhenClauses")
                    .and_then(Value::as_array)
                    .is_some_and(|clauses| {
                        clauses.iter().any(|c| {
                            let c = c.get("MergeWhenClause").unwrap_or(c);
                            let matched = flag(c, "matched")
                                || c.get("matchKind").and_then(Value::as_str)
                                    == Some("MERGE_WHEN_MATCHED");
                            let cmd = c.get("commandType").and_then(Value::as_str);
                            matched && matches!(cmd, Some("CMD_UPDATE" | "CMD_DELETE"))
                        })
                    });
                if matched_write && !mentions_column(n.get("joinCondition")) {
                    st.unbounded_write = true;
                }
            }
            "CopyStmt" => {
                let from = flag(n, "is_from");
                kinds.insert(if from { "copy-from" } else { "copy-to" });
                if from {
                    self.target(n.get("relation"));
                }
                if flag(n, "is_program") {
                    st.effects.insert("program");
                } else if n
                    .get("filename")
                    .and_then(Value::as_str)
                    .is_some_and(|f| !f.is_empty())
                {
                    st.effects.insert("server-files");
                }
            }
            "TruncateStmt" => {
                kinds.insert("truncate");
                if n.get("behavior").and_then(Value::as_str) == Some("DROP_CASCADE") {
                    // And every table with a foreign key to these, named nowhere.
                    st.effects.insert("unnamed-relations");
                }
                if let Some(Value::Array(rels)) = n.get("relations") {
                    for r in rels {
                        if let Some(rv) = r.get("RangeVar") {
                            self.target(Some(rv));
                        }
                    }
                }
            }
            "FuncCall" => {
                let name = dotted(n.get("funcname"));
                let last = name.rsplit('.').next().unwrap_or("").to_owned();
                // Sequence functions name their sequence in a string: a relation like any other.
                if matches!(
                    last.as_str(),
                    "nextval" | "setval" | "currval" | "pg_sequence_last_value"
                ) {
                    if let Some(seq) = n
                        .get("args")
                        .and_then(Value::as_array)
                        .and_then(|a| a.first())
                        .and_then(string_constant)
                    {
                        let write = matches!(last.as_str(), "nextval" | "setval");
                        self.relations.push((regclass_name(seq), write));
                        // The relation is a constant: the verdict holds for this text only.
                        st.literal_sensitive = true;
                    }
                }
                for effect in function_effects(&last) {
                    st.effects.insert(effect);
                }
                if last == "set_config" {
                    st.literal_sensitive = true;
                    // What it sets decides what it can do; a name that is not a constant could be
                    // anything.
                    let by_row = n
                        .pointer("/args/0/ColumnRef/fields")
                        .is_some_and(|f| strings(Some(f)) == ["name"]);
                    let setting = if by_row {
                        self.settings_row.clone()
                    } else {
                        n.pointer("/args/0/A_Const/sval/sval")
                            .and_then(Value::as_str)
                            .map(str::to_ascii_lowercase)
                    };
                    let value = n
                        .pointer("/args/1/A_Const/sval/sval")
                        .and_then(Value::as_str);
                    match setting.as_deref() {
                        // pg_dump's `set_config('search_path', '', false)`, or the default back:
                        // unqualified names then resolve in pg_catalog only, or as the rules read
                        // them.
                        Some("search_path") if value.is_some_and(harmless_search_path) => {}
                        Some("transaction_read_only" | "default_transaction_read_only") => {
                            st.effects.insert("read-only-change");
                        }
                        Some("standard_conforming_strings" | "client_encoding") => {
                            st.effects.insert("lexer-change");
                        }
                        Some("search_path") => {
                            st.effects.insert("search-path-change");
                        }
                        Some("role" | "session_authorization") => {
                            st.effects.insert("role-change");
                        }
                        Some(_) => {}
                        None => {
                            st.effects.insert("read-only-change");
                            st.effects.insert("lexer-change");
                            st.effects.insert("search-path-change");
                            st.effects.insert("role-change");
                        }
                    }
                }
                st.functions.insert(name);
            }
            "VariableSetStmt" => {
                let kind = n.get("kind").and_then(Value::as_str).unwrap_or("");
                // RESET and RESET ALL: back to the session's defaults (the startup values).
                kinds.insert(if kind.starts_with("VAR_RESET") {
                    "reset"
                } else {
                    "set"
                });
                set_effects(n, st);
            }
            "TransactionStmt" => {
                kinds.insert("transaction");
                if read_write_option(n.get("options")) {
                    st.effects.insert("read-only-change");
                }
                // Two-phase commit: PREPARE TRANSACTION keeps a transaction (and its locks) past
                // the session and restarts; COMMIT/ROLLBACK PREPARED decide another session's.
                // PostgreSQL allows all three in read-only transactions.
                if matches!(
                    n.get("kind").and_then(Value::as_str),
                    Some(
                        "TRANS_STMT_PREPARE"
                            | "TRANS_STMT_COMMIT_PREPARED"
                            | "TRANS_STMT_ROLLBACK_PREPARED"
                    )
                ) {
                    st.effects.insert("server-control");
                }
            }
            "VariableShowStmt" => {
                kinds.insert("show");
            }
            "ExplainStmt" => {
                kinds.insert("explain");
                if !has_option(n.get("options"), "analyze") {
                    // Nothing runs: keep the inner statement's relations as reads, not its kinds.
                    let mut inner = Statement::default();
                    let mut walk = Walk {
                        ctes: self.ctes.clone(),
                        ..Walk::default()
                    };
                    if let Some(q) = n.get("query") {
                        walk.value(q, &mut inner);
                    }
                    self.relations
                        .extend(walk.relations.into_iter().map(|(r, _)| (r, false)));
                    st.functions.extend(inner.functions);
                    return false;
                }
            }
            "DoStmt" => {
                kinds.insert("do");
            }
            "CallStmt" => {
                kinds.insert("call");
            }
            "PrepareStmt" | "DeallocateStmt" => {
                kinds.insert("prepare");
            }
            "ExecuteStmt" => {
                kinds.insert("execute");
            }
            "GrantStmt" | "GrantRoleStmt" => {
                kinds.insert(if flag(n, "is_grant") {
                    "grant"
                } else {
                    "revoke"
                });
            }
            "DropStmt"
            | "DropRoleStmt"
            | "DropdbStmt"
            | "DropOwnedStmt"
            | "DropTableSpaceStmt"
            | "DropSubscriptionStmt"
            | "DropUserMappingStmt" => {
                kinds.insert("drop");
                if key == "DropOwnedStmt"
                    || n.get("behavior").and_then(Value::as_str) == Some("DROP_CASCADE")
                {
                    // CASCADE drops what depends on the objects (views, foreign keys, tables of
                    // a schema); DROP OWNED everything a role owns: relations named nowhere.
                    st.effects.insert("unnamed-relations");
                }
                if key == "DropStmt" {
                    let schema =
                        n.get("removeType").and_then(Value::as_str) == Some("OBJECT_SCHEMA");
                    if let Some(Value::Array(objects)) = n.get("objects") {
                        for o in objects {
                            if schema {
                                // DROP SCHEMA s: every relation in it (s.*), as relation rules see them.
                                if let Some(name) =
                                    o.pointer("/String/sval").and_then(Value::as_str)
                                {
                                    self.relations.push((format!("{name}.*"), true));
                                }
                            } else if let Some(items) = o.pointer("/List/items") {
                                let name = dotted(Some(items));
                                if !name.is_empty() {
                                    self.relations.push((name, true));
                                }
                            }
                        }
                    }
                }
            }
            "CreateRoleStmt" | "AlterRoleStmt" | "AlterRoleSetStmt" | "ReassignOwnedStmt" => {
                kinds.insert(if key.starts_with("Create") {
                    "create"
                } else {
                    "alter"
                });
                st.effects.insert("privileges");
                if key == "ReassignOwnedStmt" {
                    st.effects.insert("unnamed-relations");
                }
            }
            "AlterSystemStmt" => {
                kinds.insert("alter");
                st.effects.insert("server-control");
            }
            "CreateFunctionStmt" | "RuleStmt" | "CreateTrigStmt" | "CreateEventTrigStmt" => {
                kinds.insert("create");
                st.effects.insert("code");
                if key == "RuleStmt" || key == "CreateTrigStmt" {
                    self.target(n.get("relation"));
                }
            }
            "CreateStmt"
            | "CreateTableAsStmt"
            | "IndexStmt"
            | "ViewStmt"
            | "CreateSchemaStmt"
            | "CreateSeqStmt"
            | "CreateExtensionStmt"
            | "CreatedbStmt"
            | "CompositeTypeStmt"
            | "CreateEnumStmt"
            | "CreateRangeStmt"
            | "CreateDomainStmt"
            | "DefineStmt"
            | "CreatePolicyStmt"
            | "CreatePublicationStmt"
            | "CreateSubscriptionStmt"
            | "CreateTableSpaceStmt"
            | "CreateForeignTableStmt"
            | "CreateForeignServerStmt"
            | "CreateUserMappingStmt"
            | "CreateFdwStmt"
            | "CreateStatsStmt"
            | "CreateCastStmt"
            | "CreateConversionStmt"
            | "CreateOpClassStmt"
            | "CreateOpFamilyStmt"
            | "CreatePLangStmt"
            | "CreateTransformStmt"
            | "CreateAmStmt" => {
                kinds.insert("create");
                if matches!(
                    key,
                    "ViewStmt"
                        | "DefineStmt"
                        | "CreateDomainStmt"
                        | "CreateCastStmt"
                        | "CreateConversionStmt"
                        | "CreateTransformStmt"
                        | "CreateExtensionStmt"
                        | "CreatePLangStmt"
                        | "CreateOpClassStmt"
                        | "CreateAmStmt"
                        | "CreateForeignTableStmt"
                        | "CreateForeignServerStmt"
                        | "CreateUserMappingStmt"
                        | "CreateFdwStmt"
                        | "CreateSubscriptionStmt"
                ) {
                    // A stored query (writes through an updatable view, and reads, reach
                    // relations later statements do not name), or functions that run where a
                    // statement shows no call: operators, aggregates, a domain's CHECK, casts;
                    // an extension's script and functions (dblink); a foreign table, server or
                    // user mapping (postgres_fdw reads any relation, of this database too, under
                    // a local name) and a subscription's copy.
                    st.effects.insert("code");
                }
                if let Some(r) = n.get("relation").or_else(|| n.get("view")) {
                    self.target(Some(r));
                }
                if let Some(into) = n.pointer("/into/rel") {
                    self.target(Some(into));
                }
            }
            // ALTER SCHEMA s RENAME TO t moves every relation of s (s.*) out from under the rules
            // that name it.
            "RenameStmt"
                if n.get("renameType").and_then(Value::as_str) == Some("OBJECT_SCHEMA") =>
            {
                kinds.insert("alter");
                if let Some(old) = n.get("subname").and_then(Value::as_str) {
                    self.relations.push((format!("{old}.*"), true));
                }
                if let Some(new) = n.get("newname").and_then(Value::as_str) {
                    self.relations.push((format!("{new}.*"), true));
                }
            }
            "AlterTableStmt"
            | "RenameStmt"
            | "AlterOwnerStmt"
            | "AlterObjectSchemaStmt"
            | "AlterFunctionStmt"
            | "AlterSeqStmt"
            | "AlterDatabaseStmt"
            | "AlterDatabaseSetStmt"
            | "AlterDomainStmt"
            | "AlterEnumStmt"
            | "AlterExtensionStmt"
            | "AlterPolicyStmt"
            | "AlterPublicationStmt"
            | "AlterSubscriptionStmt"
            | "AlterTableSpaceOptionsStmt"
            | "AlterDefaultPrivilegesStmt"
            | "AlterEventTrigStmt"
            | "AlterOperatorStmt"
            | "AlterTypeStmt"
            | "AlterStatsStmt"
            | "AlterCollationStmt"
            | "AlterForeignServerStmt"
            | "AlterUserMappingStmt"
            | "AlterFdwStmt" => {
                kinds.insert(if key == "AlterDefaultPrivilegesStmt" {
                    "grant"
                } else {
                    "alter"
                });
                if matches!(
                    key,
                    "AlterDomainStmt"
                        | "AlterExtensionStmt"
                        | "AlterForeignServerStmt"
                        | "AlterUserMappingStmt"
                        | "AlterFdwStmt"
                ) {
                    // ADD CONSTRAINT ... CHECK runs an expression; an extension's update script;
                    // a foreign server pointed elsewhere.
                    st.effects.insert("code");
                }
                if let Some(r) = n.get("relation") {
                    self.target(Some(r));
                }
            }
            // ALTER TABLE ... DROP COLUMN destroys data as DROP does.
            "AlterTableCmd"
                if n.get("subtype").and_then(Value::as_str) == Some("AT_DropColumn") =>
            {
                kinds.insert("drop");
            }
            "DiscardStmt" | "ListenStmt" | "UnlistenStmt" | "FetchStmt" | "ClosePortalStmt"
            | "DeclareCursorStmt" => {
                kinds.insert("session");
            }
            // LOCK TABLE ... IN ACCESS SHARE MODE (pg_dump's, for a consistent read) conflicts
            // only with ACCESS EXCLUSIVE: a reader's step, not a utility.
            "LockStmt" if n.get("mode").and_then(Value::as_i64) == Some(1) => {
                kinds.insert("session");
            }
            // NOTIFY, like pg_notify() and LISTEN, is allowed in read-only transactions.
            "NotifyStmt" => {
                kinds.insert("session");
            }
            "LockStmt"
            | "VacuumStmt"
            | "ClusterStmt"
            | "ReindexStmt"
            | "CheckPointStmt"
            | "LoadStmt"
            | "CommentStmt"
            | "SecLabelStmt"
            | "RefreshMatViewStmt"
            | "ImportForeignSchemaStmt" => {
                kinds.insert("utility");
                if key == "LoadStmt" {
                    st.effects.insert("server-control");
                }
                if key == "ImportForeignSchemaStmt" {
                    st.effects.insert("code"); // foreign tables for a whole schema
                }
            }
            _ => {}
        }
        true
    }
}

/// The effects of a SET (a `VariableSetStmt`), also where one is embedded: `ALTER DATABASE ...
/// SET`, `ALTER ROLE ... SET` and `ALTER SYSTEM SET` make it the default of later sessions.
fn set_effects(n: &Value, st: &mut Statement) {
    let kind = n.get("kind").and_then(Value::as_str).unwrap_or("");
    let reset = kind.starts_with("VAR_RESET");
    let name = n
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    match name.as_str() {
        // RESET ROLE, SET ROLE NONE, SET SESSION AUTHORIZATION DEFAULT: back to the login's
        // own role (asyncpg-style pool resets do this), not a change of it.
        "role" | "session_authorization"
            if reset
                || kind == "VAR_SET_DEFAULT"
                || (name == "role"
                    && n.pointer("/args/0/A_Const/sval/sval")
                        .and_then(Value::as_str)
                        == Some("none")) => {}
        "role" | "session_authorization" => {
            st.effects.insert("role-change");
        }
        "search_path" if !reset => {
            st.effects.insert("search-path-change");
        }
        "transaction_read_only" | "default_transaction_read_only"
            if !reset && !sets_true(n.get("args")) =>
        {
            st.effects.insert("read-only-change");
        }
        // With it off, a backslash ends a string early: the text would no longer mean what this
        // analysis (which lexes with it on) says.
        "standard_conforming_strings" | "backslash_quote"
            if !reset && !sets_true(n.get("args")) =>
        {
            st.effects.insert("lexer-change");
        }
        // A multibyte client encoding whose characters can end in a backslash: the server lexes
        // the converted text, this analysis the bytes as sent.
        "client_encoding" if !reset && sets_splitting_encoding(n.get("args")) => {
            st.effects.insert("lexer-change");
        }
        _ => {}
    }
    if read_write_option(n.get("args")) {
        st.effects.insert("read-only-change");
    }
}

/// A search_path that moves no unqualified name away from where relation rules read it: empty
/// (pg_catalog only) or the default.
fn harmless_search_path(value: &str) -> bool {
    let v: String = value.chars().filter(|c| !c.is_whitespace()).collect();
    v.is_empty()
        || v.eq_ignore_ascii_case("\"$user\",public")
        || v.eq_ignore_ascii_case("$user,public")
}

/// Whether an expression tree references a column anywhere.
fn mentions_column(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Object(map)) => map
            .iter()
            .any(|(k, child)| k == "ColumnRef" || mentions_column(Some(child))),
        Some(Value::Array(items)) => items.iter().any(|i| mentions_column(Some(i))),
        _ => false,
    }
}

fn flag(n: &Value, key: &str) -> bool {
    n.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// `schema.name` (or `name`) of a RangeVar-shaped object, lowercased as PostgreSQL folds
/// unquoted identifiers (pg_query has already folded them; quoted ones keep their case).
fn relation_name(rv: &Value) -> String {
    let rel = rv.get("relname").and_then(Value::as_str).unwrap_or("");
    match rv.get("schemaname").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => format!("{s}.{rel}"),
        _ => rel.to_owned(),
    }
}

/// Object types whose name lists (COMMENT ON, SECURITY LABEL ON, ALTER EXTENSION ... ADD) name
/// a relation.
const RELATION_OBJECTS: [&str; 6] = [
    "OBJECT_INDEX",
    "OBJECT_TABLE",
    "OBJECT_VIEW",
    "OBJECT_MATVIEW",
    "OBJECT_FOREIGN_TABLE",
    "OBJECT_SEQUENCE",
];

/// Relations a statement names as a schema (`s.*`: every relation in it) or as a bare name list,
/// where the parse tree holds no relation reference: GRANT ... ON ALL TABLES IN SCHEMA, default
/// privileges, REINDEX SCHEMA, a publication of a schema's tables, IMPORT FOREIGN SCHEMA into a
/// schema; COMMENT, SECURITY LABEL and ALTER EXTENSION ... ADD on a relation (or a column's).
fn named_wholesale(key: &str, n: &Value) -> Vec<String> {
    let field = |name: &str| n.get(name).and_then(Value::as_str);
    let schemas = |names: Vec<&str>| names.into_iter().map(|s| format!("{s}.*")).collect();
    match key {
        "GrantStmt" if field("targtype") == Some("ACL_TARGET_ALL_IN_SCHEMA") => {
            schemas(strings(n.get("objects")))
        }
        "AlterDefaultPrivilegesStmt" => schemas(
            n.get("options")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|o| o.get("DefElem"))
                .filter(|d| d.get("defname").and_then(Value::as_str) == Some("schemas"))
                .flat_map(|d| strings(d.pointer("/arg/List/items")))
                .collect(),
        ),
        "ReindexStmt" if field("kind") == Some("REINDEX_OBJECT_SCHEMA") => {
            schemas(field("name").into_iter().collect())
        }
        "CreatePublicationStmt" | "AlterPublicationStmt" => schemas(
            n.get("pubobjects")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|o| o.get("PublicationObjSpec"))
                .filter(|o| {
                    o.get("pubobjtype").and_then(Value::as_str)
                        == Some("PUBLICATIONOBJ_TABLES_IN_SCHEMA")
                })
                .filter_map(|o| o.get("name").and_then(Value::as_str))
                .collect(),
        ),
        "ImportForeignSchemaStmt" => schemas(field("local_schema").into_iter().collect()),
        "CommentStmt" | "SecLabelStmt" | "AlterExtensionContentsStmt" => {
            let column =
                field("objtype") == Some("OBJECT_COLUMN") && key != "AlterExtensionContentsStmt";
            if !column && !field("objtype").is_some_and(|t| RELATION_OBJECTS.contains(&t)) {
                return Vec::new();
            }
            let mut names = strings(n.pointer("/object/List/items"));
            if column {
                names.pop(); // a column's relation: all but the last name
            }
            if names.is_empty() {
                Vec::new()
            } else {
                vec![names.join(".")]
            }
        }
        _ => Vec::new(),
    }
}

/// The strings of a list of String nodes (`funcname`, object names, schema names).
pub(crate) fn strings(list: Option<&Value>) -> Vec<&str> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.pointer("/String/sval").and_then(Value::as_str))
        .collect()
}

/// The string of a constant argument (`'secret.seq'`, also cast: `'secret.seq'::regclass`).
fn string_constant(v: &Value) -> Option<&str> {
    let v = v.get("TypeCast").and_then(|c| c.get("arg")).unwrap_or(v);
    v.pointer("/A_Const/sval/sval").and_then(Value::as_str)
}

/// A relation name as regclass input reads it: parts folded to lower case unless double-quoted.
fn regclass_name(text: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for ch in text.chars() {
        match ch {
            '"' => quoted = !quoted,
            c if quoted => out.push(c),
            c => out.extend(c.to_lowercase()),
        }
    }
    out.trim().to_owned()
}

/// Joins a list of String nodes (`funcname`, `DropStmt` object names) with dots.
fn dotted(list: Option<&Value>) -> String {
    strings(list).join(".")
}

fn has_option(options: Option<&Value>, name: &str) -> bool {
    let Some(Value::Array(items)) = options else {
        return false;
    };
    // An option given without a value, or with any value but an explicit false, is on.
    items.iter().any(|o| {
        o.pointer("/DefElem/defname").and_then(Value::as_str) == Some(name)
            && !o.pointer("/DefElem/arg").is_some_and(option_is_false)
    })
}

/// A `transaction_read_only` option (BEGIN / SET TRANSACTION / SESSION CHARACTERISTICS) that is
/// not a constant true: READ WRITE.
fn read_write_option(options: Option<&Value>) -> bool {
    let Some(Value::Array(items)) = options else {
        return false;
    };
    items.iter().any(|o| {
        o.pointer("/DefElem/defname").and_then(Value::as_str) == Some("transaction_read_only")
            && !o
                .pointer("/DefElem/arg/A_Const")
                .is_some_and(constant_is_true)
    })
}

/// SET name = <constant true> (on, true, yes, 1): not a way out of read-only mode.
/// `SET client_encoding`/`SET NAMES` to an encoding whose characters can end in a backslash
/// (`ostiary_wire::pg::client_encoding_splits_bytes`), or to a value that is not a constant.
fn sets_splitting_encoding(args: Option<&Value>) -> bool {
    let Some(Value::Array(items)) = args else {
        return false; // SET client_encoding TO DEFAULT
    };
    items
        .first()
        .and_then(|i| i.pointer("/A_Const/sval/sval"))
        .and_then(Value::as_str)
        .is_none_or(ostiary_wire::pg::client_encoding_splits_bytes)
}

fn sets_true(args: Option<&Value>) -> bool {
    let Some(Value::Array(items)) = args else {
        return false;
    };
    items.len() == 1 && items[0].get("A_Const").is_some_and(constant_is_true)
}

/// The value of an `A_Const` (JSON omits zero and false: `{"ival": {}}` is 0).
enum Constant<'a> {
    Int(i64),
    Bool(bool),
    Str(&'a str),
    Other,
}

fn constant(c: &Value) -> Constant<'_> {
    if let Some(i) = c.get("ival") {
        return Constant::Int(i.get("ival").and_then(Value::as_i64).unwrap_or(0));
    }
    if let Some(b) = c.get("boolval") {
        return Constant::Bool(b.get("boolval").and_then(Value::as_bool).unwrap_or(false));
    }
    if let Some(s) = c.get("sval") {
        return Constant::Str(s.get("sval").and_then(Value::as_str).unwrap_or(""));
    }
    Constant::Other
}

fn constant_is_true(c: &Value) -> bool {
    match constant(c) {
        Constant::Int(i) => i == 1,
        Constant::Bool(b) => b,
        Constant::Str(s) => matches!(
            s.to_ascii_lowercase().as_str(),
            "on" | "true" | "yes" | "1" | "t" | "y"
        ),
        Constant::Other => false,
    }
}

/// An option argument node (`String`, `A_Const`, `Integer`, `Boolean`) that is an explicit false.
fn option_is_false(arg: &Value) -> bool {
    if let Some(s) = arg.pointer("/String/sval").and_then(Value::as_str) {
        return matches!(
            s.to_ascii_lowercase().as_str(),
            "off" | "false" | "no" | "0"
        );
    }
    if let Some(c) = arg.get("A_Const") {
        return match constant(c) {
            Constant::Int(i) => i == 0,
            Constant::Bool(b) => !b,
            Constant::Str(s) => matches!(
                s.to_ascii_lowercase().as_str(),
                "off" | "false" | "no" | "0"
            ),
            Constant::Other => false,
        };
    }
    arg.get("Integer")
        .is_some_and(|i| i.get("ival").and_then(Value::as_i64).unwrap_or(0) == 0)
        || arg
            .get("Boolean")
            .is_some_and(|b| !b.get("boolval").and_then(Value::as_bool).unwrap_or(false))
}

/// What calling a function can do beyond computing a value (by its name, schema dropped).
fn function_effects(name: &str) -> &'static [&'static str] {
    match name {
        "set_config" => &["config-change"],
        "pg_terminate_backend"
        | "pg_cancel_backend"
        | "pg_reload_conf"
        | "pg_rotate_logfile"
        | "pg_promote"
        | "pg_switch_wal"
        | "pg_create_restore_point"
        // Allowed in read-only transactions, yet they write WAL, persistent slots or origins,
        // reset statistics or start backups.
        | "pg_logical_emit_message"
        | "pg_create_logical_replication_slot"
        | "pg_create_physical_replication_slot"
        | "pg_copy_logical_replication_slot"
        | "pg_copy_physical_replication_slot"
        | "pg_drop_replication_slot"
        | "pg_replication_slot_advance"
        | "pg_backup_start"
        | "pg_backup_stop"
        | "pg_start_backup"
        | "pg_stop_backup"
        | "pg_import_system_collations"
        | "pg_log_backend_memory_contexts"
        | "pg_wal_replay_pause"
        | "pg_wal_replay_resume" => &["server-control"],
        n if n.starts_with("pg_replication_origin_") || n.starts_with("pg_stat_reset") => {
            &["server-control"]
        }
        // Sequences advance outside the transaction (PostgreSQL refuses them when read-only).
        "nextval" | "setval" => &["sequence-write"],
        "lo_export"
        | "lo_import"
        | "pg_read_file"
        | "pg_read_binary_file"
        | "pg_ls_dir"
        | "pg_stat_file"
        | "pg_file_write"
        | "pg_file_rename"
        | "pg_file_unlink" => &["server-files"],
        // pg_read_file_old, pg_ls_waldir, pg_ls_logdir, pg_ls_tmpdir ...
        n if n.starts_with("pg_read_") || n.starts_with("pg_ls_") || n.starts_with("pg_file_") => {
            &["server-files"]
        }
        // Index maintenance that writes the index and WAL in a read-only transaction.
        n if n.starts_with("brin_summarize")
            || n.starts_with("brin_desummarize")
            || n == "gin_clean_pending_list"
            || n.starts_with("pg_rotate_logfile") =>
        {
            &["server-control"]
        }
        n if n.starts_with("dblink") => &["remote"],
        // PostgreSQL lets read-only transactions write large objects.
        "lo_creat" | "lo_create" | "lo_from_bytea" | "lo_put" | "lo_unlink" | "lowrite"
        | "lo_truncate" | "lo_truncate64" => &["large-object-write"],
        // Built-ins that run a query or read a relation given as text or regclass: what they
        // read is not in the statement's parse tree.
        // These run the SQL text they are given (set_config spelled in pieces, any write), as
        // a DO block would.
        "query_to_xml" | "query_to_xmlschema" | "query_to_xml_and_xmlschema" | "ts_stat"
        | "ts_rewrite" => &["dynamic-sql", "runs-sql"],
        "table_to_xml"
        | "table_to_xmlschema"
        | "table_to_xml_and_xmlschema"
        | "schema_to_xml"
        | "schema_to_xmlschema"
        | "schema_to_xml_and_xmlschema"
        | "database_to_xml"
        | "database_to_xmlschema"
        | "database_to_xml_and_xmlschema" => &["dynamic-sql"],
        // Rows of any relation as logical decoding or the pages and WAL hold them (a slot's
        // changes, raw heap and index pages, full-page images): not in the parse tree either.
        // (get_ also consumes the slot's changes.)
        "pg_logical_slot_get_changes" | "pg_logical_slot_get_binary_changes" => {
            &["dynamic-sql", "server-control"]
        }
        "pg_logical_slot_peek_changes"
        | "pg_logical_slot_peek_binary_changes"
        | "get_raw_page"
        | "bt_page_items"
        | "pg_get_wal_fpi_info"
        | "pg_get_wal_block_info" => &["dynamic-sql"],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut v = analyze(sql).unwrap();
        assert_eq!(v.len(), 1, "{sql}");
        v.remove(0)
    }

    fn kinds(sql: &str) -> Vec<&'static str> {
        one(sql).kinds.into_iter().collect()
    }

    #[test]
    fn effects_that_read_only_transactions_allow_or_the_pack_must_see() {
        let effects = |sql: &str| one(sql).effects.into_iter().collect::<Vec<_>>();
        assert_eq!(
            effects("select pg_logical_emit_message(true, 'p', 'x')"),
            ["server-control"]
        );
        assert_eq!(
            effects("select pg_stat_reset_shared('bgwriter')"),
            ["server-control"]
        );
        assert_eq!(
            effects("select pg_replication_origin_create('o')"),
            ["server-control"]
        );
        assert_eq!(
            effects("select * from pg_create_logical_replication_slot('s', 'test_decoding')"),
            ["server-control"]
        );
        assert_eq!(
            effects("select nextval('s'), setval('s', 1)"),
            ["sequence-write"]
        );
        assert_eq!(
            effects("select * from t where id = 1 for update"),
            ["row-lock"]
        );
        assert_eq!(
            effects("select * from t for share skip locked"),
            ["row-lock"]
        );
        assert!(effects("select currval('s') from t").is_empty());
    }

    #[test]
    fn statements_that_reach_relations_they_do_not_name() {
        let st = one("truncate public.allowed_parent cascade");
        assert!(st.effects.contains("unnamed-relations"));
        assert!(!one("truncate t").effects.contains("unnamed-relations"));
        assert!(one("drop table t cascade")
            .effects
            .contains("unnamed-relations"));
        assert!(one("drop owned by current_user")
            .effects
            .contains("unnamed-relations"));
        assert!(one("reassign owned by a to b")
            .effects
            .contains("unnamed-relations"));
        assert_eq!(
            one("grant select on all tables in schema secret to public")
                .writes
                .into_iter()
                .collect::<Vec<_>>(),
            ["secret.*"]
        );
        assert_eq!(
            one("comment on table secret.accounts is 'x'")
                .writes
                .into_iter()
                .collect::<Vec<_>>(),
            ["secret.accounts"]
        );
        assert_eq!(
            one("comment on column secret.accounts.card is 'x'")
                .writes
                .into_iter()
                .collect::<Vec<_>>(),
            ["secret.accounts"]
        );
        assert_eq!(
            one("select setval('Secret.Seq', 1)")
                .writes
                .into_iter()
                .collect::<Vec<_>>(),
            ["secret.seq"]
        );
        assert_eq!(
            one("select currval('\"S\".seq'::regclass)")
                .reads
                .into_iter()
                .collect::<Vec<_>>(),
            ["S.seq"]
        );
        assert!(one("select * from pg_stats where schemaname = 's'")
            .effects
            .contains("dynamic-sql"));
    }

    #[test]
    fn schema_wide_statements_name_every_relation_of_the_schema() {
        let writes = |sql: &str| one(sql).writes.into_iter().collect::<Vec<_>>();
        for sql in [
            "alter default privileges in schema secret grant select on tables to public",
            "reindex schema secret",
            "create publication p for tables in schema secret",
            "import foreign schema x from server s into secret",
        ] {
            assert_eq!(writes(sql), ["secret.*"], "{sql}");
        }
        assert_eq!(
            writes("alter extension e add table secret.accounts"),
            ["secret.accounts"]
        );
        assert!(writes("alter default privileges grant select on tables to public").is_empty());
    }

    #[test]
    fn select_into_creates() {
        let st = one("select 1 as x into pwn from t");
        assert_eq!(
            st.kinds.iter().copied().collect::<Vec<_>>(),
            ["create", "select"]
        );
        assert_eq!(st.writes.into_iter().collect::<Vec<_>>(), ["pwn"]);
        assert_eq!(st.reads.into_iter().collect::<Vec<_>>(), ["t"]);
    }

    #[test]
    fn cte_names_are_scoped_as_postgresql_scopes_them() {
        let reads = |sql: &str| one(sql).reads.into_iter().collect::<Vec<_>>();
        let writes = |sql: &str| one(sql).writes.into_iter().collect::<Vec<_>>();
        // The CTE is what the statement reads.
        assert!(reads("with x as (select 1) select * from x").is_empty());
        assert_eq!(reads("with x as (select * from t) select * from x"), ["t"]);
        // A CTE defined in a subquery does not hide the table elsewhere.
        assert_eq!(
            reads("select s.* from (with secret as (select 1) select * from secret) a, secret s"),
            ["secret"]
        );
        assert_eq!(
            reads("select 1 from t where exists (with secret as (select 1) select 1 from secret) and (select 1 from secret) = 1"),
            ["secret", "t"]
        );
        // A write target is never a CTE.
        assert_eq!(
            writes("with secret as (select 1) update secret set s = 'x' where id = 1"),
            ["secret"]
        );
        assert_eq!(
            writes("with secret as (select 1) delete from secret"),
            ["secret"]
        );
        assert_eq!(
            writes("with secret as (select 1) insert into secret select * from secret"),
            ["secret"]
        );
        // In a non-recursive WITH, a CTE's own name in its query is the table; later CTEs see it.
        assert_eq!(
            reads("with secret as (select * from secret) select * from secret"),
            ["secret"]
        );
        assert!(reads("with a as (select 1), b as (select * from a) select * from b").is_empty());
        assert_eq!(
            reads("with b as (select * from a), a as (select 1) select * from b"),
            ["a"]
        );
        // RECURSIVE: its own name is the CTE.
        assert!(reads(
            "with recursive r(n) as (select 1 union all select n + 1 from r where n < 3) select * from r"
        )
        .is_empty());
        // Qualified, it is the table.
        assert_eq!(
            reads("with secret as (select 1) select * from public.secret"),
            ["public.secret"]
        );
        // EXPLAIN without ANALYZE keeps the same scoping.
        assert_eq!(
            reads(
                "explain select * from (with secret as (select 1) select 1 from secret) a, secret"
            ),
            ["secret"]
        );
    }

    #[test]
    fn kinds_by_effect() {
        assert_eq!(kinds("select * from t"), ["select"]);
        assert_eq!(
            kinds("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x"),
            ["delete", "select"]
        );
        assert_eq!(
            kinds("EXPLAIN ANALYZE DELETE FROM t"),
            ["delete", "explain"]
        );
        assert_eq!(
            kinds("EXPLAIN (analyze) DELETE FROM t"),
            ["delete", "explain"]
        );
        assert_eq!(kinds("EXPLAIN DELETE FROM t"), ["explain"]);
        assert_eq!(kinds("EXPLAIN (analyze false) DELETE FROM t"), ["explain"]);
        assert_eq!(kinds("insert into t select * from u"), ["insert", "select"]);
        assert_eq!(kinds("insert into t values (1), (2)"), ["insert"]);
        assert_eq!(
            kinds("insert into t values ((select x from u))"),
            ["insert", "select"]
        );
        assert_eq!(
            kinds("insert into t values (1) returning (select 1 from u)"),
            ["insert", "select"]
        );
        assert_eq!(kinds("values (1)"), ["select"]);
        assert_eq!(
            kinds("insert into t values (1) on conflict (id) do update set x = excluded.x"),
            ["insert", "update"]
        );
        assert_eq!(
            kinds("insert into t values (1) on conflict do nothing"),
            ["insert"]
        );
        assert_eq!(
            kinds("insert into t select * from u on conflict (id) do update set x = 1"),
            ["insert", "select", "update"]
        );
        assert_eq!(
            kinds(
                "merge into t using u on t.id = u.id when matched and u.gone then delete \
                 when matched then update set x = u.x when not matched then insert values (u.id)"
            ),
            ["delete", "insert", "merge", "update"]
        );
        assert_eq!(
            kinds("merge into t using u on t.id = u.id when matched then do nothing"),
            ["merge"]
        );
        assert_eq!(kinds("copy t to stdout"), ["copy-to"]);
        assert_eq!(kinds("copy (select 1) to stdout"), ["copy-to", "select"]);
        assert_eq!(kinds("copy t from stdin"), ["copy-from"]);
        assert_eq!(kinds("truncate t"), ["truncate"]);
        assert_eq!(kinds("drop table t"), ["drop"]);
        assert_eq!(kinds("do $$ begin end $$"), ["do"]);
        assert_eq!(kinds("call p()"), ["call"]);
        assert_eq!(kinds("prepare p as delete from t"), ["delete", "prepare"]);
        assert_eq!(kinds("execute p"), ["execute"]);
        assert_eq!(kinds("grant select on t to r"), ["grant"]);
        assert_eq!(kinds("revoke select on t from r"), ["revoke"]);
        assert_eq!(kinds("begin"), ["transaction"]);
        assert_eq!(kinds("show search_path"), ["show"]);
        assert_eq!(kinds("reset all"), ["reset"]);
        assert_eq!(kinds("discard all"), ["session"]);
        assert_eq!(kinds("vacuum t"), ["utility"]);
        assert_eq!(
            kinds("create rule r as on select to t do instead delete from u"),
            ["create", "delete"]
        );
    }

    #[test]
    fn relations_read_and_written() {
        let s = one("update public.a set x = 1 from b where a.id = b.id");
        assert_eq!(s.writes, BTreeSet::from(["public.a".to_owned()]));
        assert_eq!(s.reads, BTreeSet::from(["b".to_owned()]));
        assert!(!s.unbounded_write);
        let s = one("with x as (select * from src) insert into dst select * from x");
        assert_eq!(s.writes, BTreeSet::from(["dst".to_owned()]));
        assert_eq!(s.reads, BTreeSet::from(["src".to_owned()]));
        let s = one("delete from t");
        assert!(s.unbounded_write);
        let s = one("drop table s.t, u");
        assert_eq!(s.writes, BTreeSet::from(["s.t".to_owned(), "u".to_owned()]));
        let s = one("explain delete from t");
        assert_eq!(s.reads, BTreeSet::from(["t".to_owned()]));
        assert!(s.writes.is_empty());
        let s = one(r#"select * from "Secret"."Keys""#);
        assert_eq!(s.reads, BTreeSet::from(["Secret.Keys".to_owned()]));
    }

    #[test]
    fn functions_and_effects_wherever_they_hide() {
        for sql in [
            "select pg_terminate_backend(1)",
            "select array[pg_catalog.pg_terminate_backend(1)]",
            "select (select pg_terminate_backend(pid) from pg_stat_activity limit 1)",
            "select 1 where exists (select pg_cancel_backend(2))",
            "select * from t order by pg_reload_conf()",
            "select coalesce(null, pg_terminate_backend(3)) collate \"C\"",
        ] {
            let s = one(sql);
            assert!(s.effects.contains("server-control"), "{sql}: {s:?}");
        }
        assert!(one("select lo_export(1, '/tmp/x')")
            .effects
            .contains("server-files"));
        assert!(one("select pg_read_file('/etc/passwd')")
            .effects
            .contains("server-files"));
        assert!(one("select dblink_exec('x', 'delete from t')")
            .effects
            .contains("remote"));
        assert!(one("copy t to program 'curl x'")
            .effects
            .contains("program"));
        assert!(one("copy t from '/etc/passwd'")
            .effects
            .contains("server-files"));
        assert!(one("set role admin").effects.contains("role-change"));
        assert!(one("set session authorization admin")
            .effects
            .contains("role-change"));
        let s = one("select set_config('a', 'b', false)");
        assert_eq!(s.effects, BTreeSet::from(["config-change"]));
        let s = one("select set_config(name, 'off', false) from t");
        assert!(s.effects.contains("read-only-change") && s.effects.contains("lexer-change"));
        let s = one("select set_config('standard_conforming_strings', 'off', false)");
        assert!(s.effects.contains("lexer-change"));
        assert!(one("set standard_conforming_strings = off")
            .effects
            .contains("lexer-change"));
        assert!(one("set standard_conforming_strings to 'off'")
            .effects
            .contains("lexer-change"));
        assert!(!one("set standard_conforming_strings = on")
            .effects
            .contains("lexer-change"));
        assert_eq!(
            one("select Upper(x) from t").functions,
            BTreeSet::from(["upper".to_owned()])
        );
    }

    #[test]
    fn ways_out_of_read_only() {
        for sql in [
            "begin read write",
            "start transaction isolation level serializable, read write",
            "set transaction read write",
            "set session characteristics as transaction read write",
            "set default_transaction_read_only = off",
            "set default_transaction_read_only to 0",
            "set transaction_read_only = false",
            "set default_transaction_read_only to default",
            "select set_config('default_transaction_read_only', 'off', false)",
        ] {
            assert!(
                one(sql).effects.contains("read-only-change"),
                "{sql}: {:?}",
                one(sql)
            );
        }
        for sql in [
            "begin",
            "begin read only",
            "set transaction read only",
            "set default_transaction_read_only = on",
            "reset default_transaction_read_only",
            "reset all",
        ] {
            assert!(!one(sql).effects.contains("read-only-change"), "{sql}");
        }
    }

    #[test]
    fn several_statements_are_split_with_their_spans() {
        let sql = "select 1; delete from t where id = 2 ;select 3";
        let v = analyze(sql).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].kinds, BTreeSet::from(["delete"]));
        assert_eq!(
            &sql[v[1].start..v[1].start + v[1].len].trim(),
            &"delete from t where id = 2"
        );
        assert_eq!(&sql[v[2].start..v[2].start + v[2].len], "select 3");
    }

    #[test]
    fn what_does_not_parse_is_an_error() {
        assert!(matches!(
            analyze("DR/**/OP table t"),
            Err(AnalyzeError::Parse(_))
        ));
        assert!(matches!(
            analyze("select 'unterminated"),
            Err(AnalyzeError::Parse(_))
        ));
        assert!(analyze("").unwrap().is_empty());
    }

    #[test]
    fn a_client_encoding_that_splits_bytes_is_a_lexer_change() {
        for sql in [
            "set client_encoding = 'SJIS'",
            "set client_encoding to 'shift_jis'",
            "set names 'big5'",
            "set session client_encoding = gbk",
            "select set_config('client_encoding', 'UTF8', false)",
        ] {
            assert!(one(sql).effects.contains("lexer-change"), "{sql}");
        }
        for sql in [
            "set client_encoding = 'UTF8'",
            "set names 'latin1'",
            "reset client_encoding",
            "set client_encoding to default",
        ] {
            assert!(!one(sql).effects.contains("lexer-change"), "{sql}");
        }
    }

    #[test]
    fn settings_made_the_default_of_later_sessions_are_judged_as_the_set() {
        for (sql, effect) in [
            ("alter database app set role = 'app_admin'", "role-change"),
            (
                "alter database app set session_authorization = 'x'",
                "role-change",
            ),
            (
                "alter database app set search_path = secret, public",
                "search-path-change",
            ),
            (
                "alter database app set standard_conforming_strings = off",
                "lexer-change",
            ),
            (
                "alter database app set client_encoding = 'SJIS'",
                "lexer-change",
            ),
            (
                "alter database app set default_transaction_read_only = off",
                "read-only-change",
            ),
            ("alter role app set role = 'app_admin'", "role-change"),
            (
                "alter role app in database app set search_path = secret",
                "search-path-change",
            ),
            (
                "alter system set standard_conforming_strings = off",
                "lexer-change",
            ),
        ] {
            let s = one(sql);
            assert!(s.effects.contains(effect), "{sql}: {:?}", s.effects);
            assert!(s.kinds.contains("alter") && s.literal_sensitive, "{sql}");
        }
        for sql in [
            "alter database app set work_mem = '64MB'",
            "alter database app reset search_path",
            "alter database app set standard_conforming_strings = on",
        ] {
            let s = one(sql);
            assert!(
                !s.effects.iter().any(|e| e.ends_with("-change")),
                "{sql}: {:?}",
                s.effects
            );
        }
    }

    #[test]
    fn writes_to_pg_settings_are_set_config() {
        for sql in [
            "update pg_catalog.pg_settings set setting = 'secret' where name = 'search_path'",
            "update pg_settings set setting = 'off' where name = 'standard_conforming_strings'",
            "with x as (update pg_settings set setting = 'on' where name = 'x' returning 1) select 1",
        ] {
            let st = one(sql);
            for e in ["search-path-change", "lexer-change", "read-only-change", "role-change"] {
                assert!(st.effects.contains(e), "{sql}: {e}");
            }
        }
        assert!(!one("select * from pg_settings")
            .effects
            .contains("search-path-change"));
    }

    #[test]
    fn sequence_names_are_constants_judged_per_text() {
        assert!(one("select nextval('secret.s')").literal_sensitive);
        assert!(one("select pg_sequence_last_value('public.s1')").literal_sensitive);
        assert!(!one("select 1 from t where id = 2").literal_sensitive);
    }

    #[test]
    fn pg_dumps_settings_are_judged_by_the_setting_they_name() {
        let st = one(
            "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings \
                      WHERE name = 'restrict_nonsystem_relation_kind'",
        );
        assert!(st.effects.contains("config-change"));
        for e in [
            "read-only-change",
            "lexer-change",
            "search-path-change",
            "role-change",
        ] {
            assert!(!st.effects.contains(e), "{e}");
        }
        let st = one("select set_config(name, 'off', false) from pg_settings \
                      where name = 'default_transaction_read_only'");
        assert!(st.effects.contains("read-only-change"));
        // Another relation, or no constant: any setting could be meant.
        let st = one("select set_config(name, 'x', false) from t where name = 'work_mem'");
        assert!(st.effects.contains("read-only-change"));
        let st = one("select set_config(name, 'x', false) from pg_settings where name like 'w%'");
        assert!(st.effects.contains("search-path-change"));
        // pg_dump's empty search_path and the default back do not move names.
        assert!(
            !one("SELECT pg_catalog.set_config('search_path', '', false)")
                .effects
                .contains("search-path-change")
        );
        assert!(
            !one("select set_config('search_path', '\"$user\", public', false)")
                .effects
                .contains("search-path-change")
        );
        assert!(one("select set_config('search_path', 'secret', false)")
            .effects
            .contains("search-path-change"));
        assert_eq!(kinds("notify ch, 'x'"), ["session"]);
    }

    #[test]
    fn two_phase_commit_maintenance_and_server_files_found_by_a_hunt() {
        for (sql, effect) in [
            ("prepare transaction 'px'", "server-control"),
            ("commit prepared 'px'", "server-control"),
            ("rollback prepared 'px'", "server-control"),
            ("select brin_desummarize_range('i', 0)", "server-control"),
            ("select brin_summarize_new_values('i')", "server-control"),
            ("select gin_clean_pending_list('i')", "server-control"),
            ("select pg_rotate_logfile_old()", "server-control"),
            (
                "select pg_read_file_old('/etc/hostname', 0, 100)",
                "server-files",
            ),
            ("select * from pg_ls_waldir()", "server-files"),
            ("table pg_hba_file_rules", "server-files"),
            ("select * from pg_file_settings", "server-files"),
        ] {
            assert!(one(sql).effects.contains(effect), "{sql}");
        }
        assert!(one("commit").effects.is_empty());
        assert_eq!(kinds("lock table t in access share mode"), ["session"]);
        assert_eq!(kinds("lock table t"), ["utility"]);
        assert_eq!(kinds("lock table t in row exclusive mode"), ["utility"]);
    }

    #[test]
    fn returning_to_the_login_role_is_not_a_role_change() {
        for sql in [
            "reset role",
            "set role none",
            "reset session authorization",
            "set session authorization default",
            "reset all",
        ] {
            assert!(!one(sql).effects.contains("role-change"), "{sql}");
        }
        for sql in [
            "set role admin",
            "set role 'none2'",
            "set session authorization admin",
            "set local role admin",
        ] {
            assert!(one(sql).effects.contains("role-change"), "{sql}");
        }
    }

    #[test]
    fn operators_domains_and_casts_are_code() {
        for sql in [
            "create operator public.#@# (leftarg = text, rightarg = text, function = pg_notify)",
            "create domain public.name as text check (value <> '')",
            "alter domain d add constraint c check (value <> '')",
            "create aggregate a (text) (sfunc = textcat, stype = text)",
            "create cast (text as int) with function f(text)",
        ] {
            assert!(one(sql).effects.contains("code"), "{sql}");
        }
    }

    #[test]
    fn foreign_data_and_extensions_are_code() {
        for sql in [
            "create extension dblink",
            "alter extension dblink update",
            "create server s foreign data wrapper postgres_fdw options (dbname 'app')",
            "alter server s options (set host 'elsewhere')",
            "create user mapping for current_user server s options (user 'x')",
            "alter user mapping for current_user server s options (set user 'y')",
            "create foreign data wrapper w handler h",
            "create foreign table public.t (pw text) server s options (schema_name 'secret')",
            "import foreign schema secret from server s into public",
            "create subscription sub connection 'dbname=app' publication p",
        ] {
            assert!(one(sql).effects.contains("code"), "{sql}");
        }
    }

    #[test]
    fn views_are_code() {
        assert!(one("create view y.v as select id from public.orders")
            .effects
            .contains("code"));
        assert!(one("create or replace view v as select 1")
            .effects
            .contains("code"));
        assert!(!one("create table t (id int)").effects.contains("code"));
    }

    #[test]
    fn functions_that_run_sql_text() {
        for sql in [
            "select query_to_xml('select 1', true, false, '')",
            "select pg_catalog.query_to_xml_and_xmlschema($1, true, false, '')",
            "select * from ts_stat('select v from t')",
        ] {
            let st = one(sql);
            assert!(
                st.effects.contains("runs-sql") && st.effects.contains("dynamic-sql"),
                "{sql}"
            );
        }
        assert!(!one("select table_to_xml('t', true, false, '')")
            .effects
            .contains("runs-sql"));
    }

    #[test]
    fn set_config_of_the_role_is_a_role_change() {
        for sql in [
            "select set_config('role', 'app_admin', false)",
            "select set_config('ROLE', 'app_admin', true)",
            "select set_config('session_authorization', 'x', false)",
            "select set_config(n, v, false) from t",
        ] {
            assert!(one(sql).effects.contains("role-change"), "{sql}");
        }
        assert!(!one("select set_config('work_mem', '1MB', false)")
            .effects
            .contains("role-change"));
    }

    #[test]
    fn merge_on_a_constant_condition_is_an_unbounded_write() {
        for sql in [
            "merge into t using (select 1) s on true when matched then delete",
            "merge into t using s on 1 = 1 when matched then update set v = 'x'",
            "merge into t using s on true when not matched then insert values (1) \
             when matched then delete",
        ] {
            assert!(one(sql).unbounded_write, "{sql}");
        }
        for sql in [
            "merge into t using s on t.id = s.id when matched then delete",
            "merge into t using s on true when not matched then insert values (1)",
        ] {
            assert!(!one(sql).unbounded_write, "{sql}");
        }
    }

    #[test]
    fn dropping_a_column_is_a_drop() {
        let s = one("alter table t drop column v");
        assert!(s.kinds.contains("drop") && s.writes.contains("t"));
        let s = one("alter table t add column w int, drop column if exists v");
        assert!(s.kinds.contains("drop"));
        assert!(!one("alter table t add column w int").kinds.contains("drop"));
        assert!(!one("alter table t drop constraint c")
            .kinds
            .contains("drop"));
    }

    #[test]
    fn a_schema_renamed_or_dropped_touches_every_relation_in_it() {
        let s = one("alter schema secret rename to notsecret");
        assert!(
            s.writes.contains("secret.*") && s.writes.contains("notsecret.*"),
            "{s:?}"
        );
        let s = one("drop schema secret cascade");
        assert!(s.writes.contains("secret.*"), "{s:?}");
        let s = one("drop table secret.keys");
        assert!(s.writes.contains("secret.keys"), "{s:?}");
    }

    #[test]
    fn functions_that_read_relations_named_in_text_are_dynamic_sql() {
        for sql in [
            "select query_to_xml('select * from secret.keys', false, false, '')",
            "select table_to_xml('secret.keys'::regclass, false, false, '')",
            "select * from ts_stat('select k::tsvector from secret.keys')",
            "select pg_catalog.database_to_xml(true, true, '')",
            "select data from pg_logical_slot_peek_changes('s', null, null)",
            "select * from pg_catalog.pg_logical_slot_get_binary_changes('s', null, null)",
            "select get_raw_page('secret.keys', 0)",
            "select * from public.bt_page_items('secret.keys_pkey', 1)",
        ] {
            assert!(one(sql).effects.contains("dynamic-sql"), "{sql}");
        }
    }

    #[test]
    fn large_object_writes_are_an_effect() {
        for sql in [
            "select lo_from_bytea(0, 'x')",
            "select lo_create(0)",
            "select pg_catalog.lo_unlink(16384)",
            "select lo_put(16384, 0, 'x')",
        ] {
            assert!(one(sql).effects.contains("large-object-write"), "{sql}");
        }
        assert!(one("select lo_get(16384)").effects.is_empty());
    }
}
