//! Could this statement turn a read-only session writable? A cheap, conservative text check that
//! picks the statements the control plane then analyses with the parser.
//!
//! A read-only grant's upstream session starts with `default_transaction_read_only=on`, so
//! PostgreSQL refuses writes; `RESET` and `DISCARD ALL` return to that startup value. What remains
//! is a client switching it off. Without parsing, this flags any statement that mentions a way to
//! do so:
//!
//! * `read write` (BEGIN / START TRANSACTION / SET TRANSACTION / SET SESSION CHARACTERISTICS),
//! * `transaction_read_only` (both settings, whatever the assignment syntax),
//! * `set_config` (the function form of SET), `dblink` (a second connection, not read-only),
//!   `pg_settings` (whose UPDATE is set_config), `standard_conforming_strings`, `client_encoding`
//!   and `set names` (how the server lexes later text),
//! * `u&` (Unicode escapes could spell a setting's name in a quoted identifier or string),
//! * the word `do` (anonymous code blocks can run dynamic SQL),
//! * large-object writes (`lo_creat`/`lo_create`, `lo_from_bytea`, `lo_import`, `lo_put`,
//!   `lo_unlink`, `lowrite`, `lo_truncate`), which PostgreSQL allows in read-only transactions.
//!
//! The words are looked for in three normalisations of the text, and any hit flags it: the raw
//! text with comment markers turned into spaces, and the text with comments removed as PostgreSQL's
//! lexer removes them, once with `standard_conforming_strings` on and once off (a client can change
//! it, and it decides whether a backslash ends a string early, so whether a later `/*` opens a
//! comment). Nested block comments, `'...'`, `E'...'`, dollar quotes and quoted identifiers are
//! followed; ASCII letters are lowercased, double quotes dropped, whitespace runs made one space.
//!
//! A lone `SHOW name` is not flagged. False positives (a string literal that contains those words)
//! are possible and cost one analysis: a flagged statement is refused by what the parser finds in
//! it (`ostiary.policy.enforce.read_only_refusal`), which is why such sessions also keep the
//! server's lexer where the parser's is (standard-conforming strings, no splitting encoding). A
//! function already in the database that runs dynamic SQL is out of its reach; for a guarantee the
//! database enforces, read-only grants should use a reader role.

use crate::lex::{dollar_quote_end, is_ident_char, skip_block_comment, skip_quoted};

/// True when `sql` could turn read-only mode off (see the module documentation).
pub fn may_leave_read_only(sql: &str) -> bool {
    any_reading(sql, flags)
}

/// Whether `test` holds for any of the three normalisations of `sql` (see the module
/// documentation).
fn any_reading(sql: &str, test: fn(&str) -> bool) -> bool {
    [
        Comments::MarkersAsSpace,
        Comments::Removed {
            backslash_quotes: false,
        },
        Comments::Removed {
            backslash_quotes: true,
        },
    ]
    .into_iter()
    .any(|mode| test(&normalise(sql, mode)))
}

fn flags(flat: &str) -> bool {
    if is_lone_show(flat) {
        return false;
    }
    const NEEDLES: [&str; 9] = [
        "read write",
        "transaction_read_only",
        "set_config",
        "dblink",
        "u&",
        // How the lexer could come to read text otherwise than the parser that judges it, and
        // UPDATE pg_settings (set_config by another name).
        "standard_conforming_strings",
        "client_encoding",
        "set names",
        "pg_settings",
    ];
    // Called, not merely named: libpq's large-object API starts by looking these names up in
    // pg_proc (as string constants), and its reads must keep working.
    const LARGE_OBJECT_WRITES: [&str; 7] = [
        "lo_creat",
        "lo_from_bytea",
        "lo_import",
        "lo_put",
        "lo_unlink",
        "lowrite",
        "lo_truncate",
    ];
    NEEDLES.iter().any(|n| flat.contains(n))
        || has_word(flat, "do")
        || LARGE_OBJECT_WRITES.iter().any(|n| calls(flat, n))
}

/// True when `sql` could act on the server in ways a read-only transaction allows: COPY (to a
/// server file or a program), ALTER SYSTEM, VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT,
/// NOTIFY, REFRESH, calls of the functions that signal backends, reload the configuration, write
/// files, WAL messages, replication slots or origins, reset statistics or start backups, and of
/// those that run SQL text (`query_to_xml`, `ts_stat`, `ts_rewrite`). Such statements are analysed with the parser before they run
/// (a reader role is the database's own guarantee; this one is the gateway's).
pub fn may_act_on_server(sql: &str) -> bool {
    any_reading(sql, acts_on_server)
}

fn acts_on_server(flat: &str) -> bool {
    // By prefix: `pg_read_` covers pg_read_file and pg_read_binary_file, and so on.
    const CALLS: [&str; 29] = [
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_promote",
        "pg_switch_wal",
        "pg_create_",
        "pg_copy_",
        "pg_drop_replication_slot",
        "pg_replication_",
        "pg_logical_",
        "pg_backup_",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_stat_reset",
        "pg_import_system_collations",
        "pg_log_backend_memory_contexts",
        "pg_wal_replay_",
        "pg_read_",
        "pg_ls_",
        "pg_stat_file",
        "pg_file_",
        "lo_export",
        // Built-ins that run the SQL text they are given (set_config spelled in pieces).
        "query_to_xml",
        "ts_stat",
        "ts_rewrite",
        // Index maintenance that writes the index and WAL.
        "brin_summarize",
        "brin_desummarize",
        "gin_clean_pending_list",
    ];
    // Utility statements a read-only transaction allows that rewrite tables, take their locks or
    // signal other sessions (analysed: `explain analyze` is a read).
    const UTILITIES: [&str; 11] = [
        "vacuum",
        "analyze",
        "analyse",
        "cluster",
        "reindex",
        "checkpoint",
        "refresh",
        // LOCK TABLE in any mode; LOAD of a library; two-phase commit (PREPARE TRANSACTION keeps
        // a transaction and its locks past the session; COMMIT/ROLLBACK PREPARED decide another's).
        "lock",
        "load",
        "prepare",
        "prepared",
    ];
    // Views of the server's configuration files.
    const VIEWS: [&str; 3] = [
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_file_settings",
    ];
    crate::mentions_copy(flat)
        || flat.contains("alter system")
        || VIEWS.iter().any(|v| flat.contains(v))
        || CALLS.iter().any(|n| calls(flat, n))
        || UTILITIES.iter().any(|w| has_word(flat, w))
}

/// Whether `flat` has a call of a function whose name starts with `prefix`: the name, more
/// identifier characters, at most one space (whitespace and comments are one space by now) and
/// an opening parenthesis.
fn calls(flat: &str, prefix: &str) -> bool {
    let b = flat.as_bytes();
    let mut from = 0;
    while let Some(at) = flat[from..].find(prefix) {
        let mut i = from + at + prefix.len();
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i < b.len() && b[i] == b'(' {
            return true;
        }
        from += at + prefix.len();
    }
    false
}

/// How comments are treated by `normalise`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comments {
    /// `--`, `/*` and `*/` become spaces; what they enclose stays.
    MarkersAsSpace,
    /// Removed as PostgreSQL's lexer would, following string literals; `backslash_quotes` is
    /// `standard_conforming_strings = off` (a backslash escapes a quote in `'...'`).
    Removed { backslash_quotes: bool },
}

/// ASCII lowercased, double quotes dropped, whitespace runs as one space; comments per `mode`.
pub fn normalise(sql: &str, mode: Comments) -> String {
    let mut out = Flat::with_capacity(sql.len());
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        match (mode, c, next) {
            (Comments::MarkersAsSpace, b'-', Some(b'-'))
            | (Comments::MarkersAsSpace, b'/', Some(b'*'))
            | (Comments::MarkersAsSpace, b'*', Some(b'/')) => {
                out.space();
                i += 2;
            }
            (Comments::Removed { .. }, b'-', Some(b'-')) => {
                while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                    i += 1;
                }
                out.space();
            }
            (Comments::Removed { .. }, b'/', Some(b'*')) => {
                i = skip_block_comment(b, i);
                out.space();
            }
            (Comments::Removed { backslash_quotes }, b'\'', _) => {
                let escapes = backslash_quotes || is_escape_string_prefix(b, i);
                i = copy_quoted(sql, i, escapes, &mut out);
            }
            (Comments::Removed { .. }, b'"', _) => {
                i = copy_quoted(sql, i, false, &mut out);
            }
            (Comments::Removed { .. }, b'$', _) => match dollar_quote_end(b, i) {
                Some(end) => {
                    out.push_str(&String::from_utf8_lossy(&b[i..end]));
                    i = end;
                }
                None => {
                    out.push('$');
                    i += 1;
                }
            },
            _ => {
                let ch = sql[i..].chars().next().expect("in bounds");
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out.s
}

/// The output of `normalise`: lowercases, drops `"`, collapses whitespace.
struct Flat {
    s: String,
    pending_space: bool,
}

impl Flat {
    fn with_capacity(n: usize) -> Self {
        Flat {
            s: String::with_capacity(n),
            pending_space: false,
        }
    }

    fn space(&mut self) {
        self.pending_space = true;
    }

    fn push(&mut self, c: char) {
        if c == '"' {
            return;
        }
        if c.is_whitespace() {
            self.pending_space = true;
            return;
        }
        if self.pending_space && !self.s.is_empty() {
            self.s.push(' ');
        }
        self.pending_space = false;
        self.s.push(c.to_ascii_lowercase());
    }

    fn push_str(&mut self, text: &str) {
        for c in text.chars() {
            self.push(c);
        }
    }
}

/// `E'...'` (any case) opens a string where a backslash escapes; so does `U&` not, nor `B`/`X`.
fn is_escape_string_prefix(b: &[u8], quote: usize) -> bool {
    quote > 0 && matches!(b[quote - 1], b'e' | b'E') && (quote == 1 || !is_ident_char(b[quote - 2]))
}

/// Copies the quoted token opening at `i` (see `lex::skip_quoted`); returns the index after it.
fn copy_quoted(sql: &str, i: usize, escapes: bool, out: &mut Flat) -> usize {
    let b = sql.as_bytes();
    let end = skip_quoted(b, i, escapes);
    out.push_str(&String::from_utf8_lossy(&b[i..end]));
    end
}

fn is_lone_show(flat: &str) -> bool {
    let Some(rest) = flat.strip_prefix("show ") else {
        return false;
    };
    let rest = rest.strip_suffix(';').unwrap_or(rest).trim_end();
    !rest.is_empty()
        && rest
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'.')
}

/// `word` standing alone: not preceded or followed by an identifier character.
fn has_word(flat: &str, word: &str) -> bool {
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let b = flat.as_bytes();
    let mut from = 0;
    while let Some(at) = flat[from..].find(word) {
        let start = from + at;
        let end = start + word.len();
        let before = start == 0 || !ident(b[start - 1]);
        let after = end == b.len() || !ident(b[end]);
        if before && after {
            return true;
        }
        from = start + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_every_way_out_we_know() {
        for sql in [
            "set default_transaction_read_only = off",
            "SET default_transaction_read_only TO false",
            r#"SET "default_transaction_read_only" = 0"#,
            "set transaction_read_only = off",
            "begin read write",
            "BEGIN ISOLATION LEVEL SERIALIZABLE, READ\n\tWRITE",
            "start transaction /* hide */ read /* and */ write",
            "start transaction read/*x*/write",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "set transaction read write",
            "select set_config('default_transaction_read_only', 'off', false)",
            "SELECT pg_catalog.SET_CONFIG('x', 'y', false)",
            "do $$ begin perform 1; end $$",
            "DO LANGUAGE plpgsql $$ begin end $$",
            "select 1; do 'begin end'",
            "select dblink_exec('dbname=app', 'insert into t values (1)')",
            r#"set U&"default_transaction\005fread_only" = off"#,
            "select 1 /* nested /* comment */ read write */",
            // A comment opener inside a string does not open a comment ...
            "select '/*'; begin read/*x*/write; select '*/'",
            // ... unless a backslash ended the string early (standard_conforming_strings off).
            "select 'a\\' /* '; begin read /*x*/ write; -- */'",
            "select e'a\\' /* '; begin read /*x*/ write; -- */'",
            "select $q$ /* $q$; begin read /*x*/ write; -- */",
            "select 1 -- line comment\n; begin read write",
            // Large-object writes, which read-only transactions allow.
            "select lo_from_bytea(0, 'x')",
            "SELECT LO_CREATE(0)",
            "select lo_creat(-1)",
            "select pg_catalog.lo_put(16384, 0, 'x')",
            "select lo_unlink(16384)",
            "set standard_conforming_strings = off",
            "set client_encoding = 'SJIS'",
            "SET NAMES 'BIG5'",
            "update pg_catalog.pg_settings set setting = 'off' where name = 'x'",
            "select lowrite(0, 'x')",
            "select lo_truncate(0, 0)",
            "select lo_import('/etc/passwd')",
            "select lo_create /* x */ (0)",
            r#"select "lo_truncate64"(0, 0)"#,
        ] {
            assert!(may_leave_read_only(sql), "{sql}");
        }
    }

    #[test]
    fn lets_ordinary_reads_through() {
        for sql in [
            "select * from orders where id = 42",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            "show default_transaction_read_only",
            "SHOW transaction_read_only;",
            "begin",
            "begin read only",
            "start transaction isolation level repeatable read",
            "commit",
            "reset all",
            "discard all",
            "select done, domain, undo from t",
            "select 'read' as a, 'write' as b",
            "with x as (select 1) select * from x",
            // libpq's large-object API looks the functions up before \lo_export reads one.
            "select proname, oid from pg_catalog.pg_proc where proname in ('lo_open', 'lo_close', \
             'lo_creat', 'lo_create', 'lo_unlink', 'lo_lseek', 'lo_lseek64', 'lo_tell', \
             'lo_tell64', 'lo_truncate', 'lo_truncate64', 'loread', 'lowrite') and pronamespace = \
             (select oid from pg_catalog.pg_namespace where nspname = 'pg_catalog')",
            "select lo_get(16384)",
        ] {
            assert!(!may_leave_read_only(sql), "{sql}");
        }
    }

    #[test]
    fn normalise_follows_the_lexer() {
        let removed = Comments::Removed {
            backslash_quotes: false,
        };
        assert_eq!(
            normalise("  SELECT/*a /*b*/ c*/1 --x\n  \"Q\"  ", removed),
            "select 1 q"
        );
        assert_eq!(normalise("a\u{a0}b é", removed), "a b é");
        assert_eq!(normalise("select /* open", removed), "select");
        assert_eq!(
            normalise("select '/*' || 'x'", removed),
            "select '/*' || 'x'"
        );
        assert_eq!(normalise("select $$--$$, 1", removed), "select $$--$$, 1");
        assert_eq!(normalise("select a$b$ /*c*/ 1", removed), "select a$b$ 1");
        assert_eq!(normalise("select $1 /*c*/", removed), "select $1");
        assert_eq!(
            normalise("select 1 /* c */ --d", Comments::MarkersAsSpace),
            "select 1 c d"
        );
    }

    #[test]
    fn show_with_more_is_not_lone() {
        assert!(may_leave_read_only(
            "show x; set transaction_read_only = off"
        ));
        assert!(may_leave_read_only(
            "show transaction_read_only; begin read write"
        ));
    }
}

#[cfg(test)]
mod server_tests {
    use super::may_act_on_server;

    #[test]
    fn server_actions_are_flagged_for_analysis() {
        for sql in [
            "copy (select 1) to program 'id'",
            "COPY t TO '/tmp/x'",
            "alter /* */ system set log_statement = 'none'",
            "select pg_reload_conf()",
            "select pg_terminate_backend(1)",
            "select pg_logical_emit_message(true, 'p', 'x')",
            "select * from pg_create_logical_replication_slot('s', 'test_decoding')",
            "select pg_stat_reset()",
            "select pg_read_file('/etc/passwd')",
            "select lo_export(1, '/tmp/x')",
            "select \"pg_reload_conf\"()",
            "select query_to_xml('select 1', true, false, '')",
            "select pg_catalog.query_to_xml_and_xmlschema($1, true, false, '')",
            "select ts_stat('select v from t')",
            "vacuum full orders",
            "cluster orders using orders_pkey",
            "reindex table customers",
            "ANALYZE orders",
            "refresh materialized view mv",
            "lock table t in access exclusive mode",
            "load 'plpgsql'",
            "prepare transaction 'px'",
            "commit prepared 'px'",
            "select brin_desummarize_range('i', 0)",
            "table pg_hba_file_rules",
        ] {
            assert!(may_act_on_server(sql), "{sql}");
        }
        for sql in [
            "select * from t",
            "select relname from pg_class",
            "select 'pg_reload_conf' as name",
            "show log_statement",
            "listen ch",
            "select pg_notify_queue_usage()",
        ] {
            assert!(!may_act_on_server(sql), "{sql}");
        }
    }
}
