//! Ostiary's masking engine: compiled rule sets that find and replace sensitive values in result
//! bytes, in linear time, without Python and without sockets.
//!
//! Theory of operation. A [`MaskSet`] compiles every content pattern of every rule (built-in
//! detectors and custom RE2-syntax patterns) into one multi-pattern `regex_automata::meta::Regex`
//! with leftmost-first semantics, pattern order = rule order. A lazy DFA costs about one dependent
//! table load per byte, too slow to run over every result byte, so it only runs over the values
//! a first stage selects (see `prefilter`): a SIMD scan for the byte shapes every digit-bearing
//! built-in needs, and a gate regex of the literal-prefixed built-ins and custom patterns (whose
//! literal prefilters skip most text). Within a selected value, the full search finds the
//! leftmost candidate and which pattern won there; the pattern's check (a validator, possibly
//! narrowing the span) then decides. When the check fails, the later patterns are tried anchored
//! at the same position (each also has its own compiled regex for that), and if none confirms,
//! the search resumes one byte further on. So the result is: leftmost non-overlapping findings,
//! the earlier rule winning at a given position, and a rejected candidate never hides a real
//! finding at the same place or later.
//!
//! Rules of this crate:
//! - Text is bytes. Nothing here panics on invalid UTF-8: built-in patterns are ASCII; custom
//!   patterns keep Unicode classes (which only ever match valid UTF-8); strategies work on
//!   characters for valid UTF-8 and on bytes otherwise.
//! - No pattern matches NUL, so a batch of values joined by NUL bytes is searched in one call and
//!   no finding spans two values; `^` and `$` mean start and end of a value. Custom patterns have
//!   NUL removed from their classes; an explicit NUL is refused.
//! - Two stages (see `prefilter`): a SIMD trigger scan plus a gate regex (literal-prefixed
//!   built-ins and custom patterns) pick the values worth searching; only those go through the
//!   full multi-pattern search, value by value.
//! - No pattern matches the empty string (refused at compile time), so every finding makes
//!   progress.

pub mod detectors;
mod prefilter;
mod validate;

use hmac::{Hmac, Mac};
use regex_automata::meta::{self, Regex};
use regex_automata::{Anchored, Input, MatchKind};
use regex_syntax::hir::{Class, Hir, HirKind};
use sha2::Sha256;

/// A rule set that cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("masking rule {rule:?}: {message}")]
    Rule { rule: String, message: String },
}

/// What replaces a finding (or a whole value, for column rules).
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// The match becomes a fixed token, e.g. "****" or "[redacted]".
    Redact { token: String },
    /// Same length in characters, every character replaced by `ch` (an ASCII char).
    Mask { ch: u8 },
    /// Keep the last `keep_last` characters, mask the rest with `ch`; with `keep_domain`, a value
    /// containing '@' keeps "@domain" and masks the local part instead. A value of `keep_last`
    /// characters or fewer is masked entirely (keeping it all would reveal it).
    Partial {
        keep_last: usize,
        keep_domain: bool,
        ch: u8,
    },
    /// Keyed hash: lowercase hex of the first 16 bytes of HMAC-SHA-256(key, match) (32 chars),
    /// stable so masked values still join and group.
    Hash { key: Vec<u8> },
    /// The whole value becomes SQL NULL.
    Null,
}

/// One masking rule as the policy states it.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub name: String,
    /// Built-in detector names (see [`detectors::BUILTINS`]), any number.
    pub detectors: Vec<String>,
    /// A custom pattern in RE2 syntax (may be None).
    pub pattern: Option<String>,
    /// Validator for the custom pattern: None or one of "luhn", "mod97" (IBAN), "ssn", "ipv4", "jwt".
    pub validator: Option<String>,
    pub strategy: Strategy,
}

/// What masking did to one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Changed,
    Null,
}

/// How a candidate of one pattern is confirmed.
#[derive(Clone, Copy)]
enum Check {
    None,
    Builtin(detectors::Check),
    Custom(fn(&[u8]) -> bool),
}

/// One compiled pattern: the rule it belongs to and its check. Pattern ids index `MaskSet::pats`.
struct Pat {
    rule: usize,
    check: Check,
}

struct Rule {
    name: String,
    strategy: Strategy,
}

/// A compiled rule set. Send + Sync; compile once and share (`Arc`) across sessions.
pub struct MaskSet {
    rules: Vec<Rule>,
    pats: Vec<Pat>,
    /// All patterns, leftmost-first in pattern order; None when no rule has content matching.
    all: Option<Regex>,
    /// Each pattern alone, for anchored retries after a check rejected a candidate.
    single: Vec<Regex>,
    /// First stage: trigger shapes of the digit-bearing built-ins...
    shapes: prefilter::Shapes,
    /// ... and one regex for the literal-prefixed built-ins and the custom patterns (anchors
    /// removed), which only selects values.
    gate: Option<Regex>,
}

impl std::fmt::Debug for MaskSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskSet")
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .field("patterns", &self.pats.len())
            .finish()
    }
}

impl MaskSet {
    /// Compiles rules. A rule with neither detectors nor pattern is allowed (it is a column-only
    /// rule: it contributes no content matching but `apply` works for it). Unknown detector,
    /// unknown validator, a pattern the engine cannot compile, a pattern that can match the empty
    /// string, or a pattern that can match a NUL byte (\x00) is a MaskError naming the rule.
    pub fn new(rules: Vec<RuleSpec>) -> Result<MaskSet, MaskError> {
        let mut pats = Vec::new();
        let mut hirs = Vec::new();
        let mut shapes = prefilter::Shapes::default();
        let mut gates = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        for (index, spec) in rules.into_iter().enumerate() {
            let err = |message: String| MaskError::Rule {
                rule: spec.name.clone(),
                message,
            };
            for name in &spec.detectors {
                let builtin = detectors::builtin(name).ok_or_else(|| {
                    err(format!(
                        "unknown detector {name:?} (known: {})",
                        detectors::BUILTINS.join(", ")
                    ))
                })?;
                let hir = builtin_hir(builtin.pattern);
                match builtin.shapes {
                    Some(s) => shapes.add(s),
                    None => gates.push(hir.clone()),
                }
                hirs.push(hir);
                pats.push(Pat {
                    rule: index,
                    check: Check::Builtin(builtin.check),
                });
            }
            let check = match &spec.validator {
                None => Check::None,
                Some(v) => Check::Custom(validate::by_name(v).ok_or_else(|| {
                    err(format!(
                        "unknown validator {v:?} (known: {})",
                        validate::NAMES.join(", ")
                    ))
                })?),
            };
            match &spec.pattern {
                Some(pattern) => {
                    let hir = custom_hir(pattern).map_err(err)?;
                    single_regex(&hir).map_err(err)?;
                    gates.push(without_anchors(hir.clone()));
                    hirs.push(hir);
                    pats.push(Pat { rule: index, check });
                }
                None if spec.validator.is_some() => {
                    return Err(err("a validator needs a pattern".into()));
                }
                None => {}
            }
            compiled.push(Rule {
                name: spec.name,
                strategy: spec.strategy,
            });
        }
        let all = if hirs.is_empty() {
            None
        } else {
            let re = builder()
                .build_many_from_hir(&hirs)
                .map_err(|e| MaskError::Rule {
                    rule: compiled[pats[pats.len() - 1].rule].name.clone(),
                    message: format!("the rule set is too large to compile: {e}"),
                })?;
            Some(re)
        };
        let gate = if gates.is_empty() {
            None
        } else {
            Some(
                builder()
                    .build_many_from_hir(&gates)
                    .map_err(|e| MaskError::Rule {
                        rule: compiled[pats[pats.len() - 1].rule].name.clone(),
                        message: format!("the rule set is too large to compile: {e}"),
                    })?,
            )
        };
        let single = hirs
            .iter()
            .map(|h| single_regex(h).expect("pattern compiled alone above"))
            .collect();
        Ok(MaskSet {
            rules: compiled,
            pats,
            all,
            single,
            shapes,
            gate,
        })
    }

    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    pub fn rule_name(&self, rule: usize) -> &str {
        &self.rules[rule].name
    }

    /// True if any rule has content matching (detectors or pattern).
    pub fn has_content(&self) -> bool {
        self.all.is_some()
    }

    /// Masks the content matches in `text` (leftmost, non-overlapping; when two rules could match
    /// at the same place, the earlier rule wins; a match whose validator fails is not a match and
    /// scanning continues so that another rule/detector can still match there or later).
    /// Appends the masked text to `out` only when the outcome is Changed (out untouched
    /// otherwise). Null when a matching rule's strategy is Null. Adds 1 per masked match to
    /// counts[rule] (counts.len() == rules()).
    pub fn mask_text(&self, text: &[u8], out: &mut Vec<u8>, counts: &mut [u64]) -> Outcome {
        let mark = out.len();
        let mut copied = 0;
        let mut outcome = Outcome::Unchanged;
        self.scan(text, &mut |start, end, rule| {
            counts[rule] += 1;
            out.extend_from_slice(&text[copied..start]);
            if !self.replace(rule, &text[start..end], out) {
                outcome = Outcome::Null;
                return false;
            }
            copied = end;
            outcome = Outcome::Changed;
            true
        });
        match outcome {
            Outcome::Changed => out.extend_from_slice(&text[copied..]),
            Outcome::Null => out.truncate(mark),
            Outcome::Unchanged => {}
        }
        outcome
    }

    /// Like mask_text but every replacement keeps the byte length of the match (the matched bytes
    /// are overwritten with b'*' whatever the strategy) and Null is never returned; for binary
    /// containers (arrays/records in binary format) whose structure must not move. Overwrites in
    /// place.
    pub fn mask_fixed_len(&self, bytes: &mut [u8], counts: &mut [u64]) -> Outcome {
        let mut spans = Vec::new();
        self.scan(bytes, &mut |start, end, rule| {
            spans.push((start, end, rule));
            true
        });
        for &(start, end, rule) in &spans {
            bytes[start..end].fill(b'*');
            counts[rule] += 1;
        }
        if spans.is_empty() {
            Outcome::Unchanged
        } else {
            Outcome::Changed
        }
    }

    /// Finds content matches in a batch buffer in one pass: `hay` holds many values separated by
    /// NUL bytes (patterns never match NUL, so no match spans two values). Calls f(start, end,
    /// rule) for each validated match in order. This is the fast path; the caller batches a whole
    /// network chunk.
    pub fn find_matches(&self, hay: &[u8], mut f: impl FnMut(usize, usize, usize)) {
        self.scan(hay, &mut |start, end, rule| {
            f(start, end, rule);
            true
        });
    }

    /// Writes the replacement for `matched` under `rule`'s strategy to `out`; returns false if
    /// the strategy is Null (nothing written).
    pub fn replace(&self, rule: usize, matched: &[u8], out: &mut Vec<u8>) -> bool {
        match &self.rules[rule].strategy {
            Strategy::Redact { token } => out.extend_from_slice(token.as_bytes()),
            Strategy::Mask { ch } => fill(out, *ch, char_count(matched)),
            Strategy::Partial {
                keep_last,
                keep_domain,
                ch,
            } => partial(matched, *keep_last, *keep_domain, *ch, out),
            Strategy::Hash { key } => hash(key, matched, out),
            Strategy::Null => return false,
        }
        true
    }

    /// Applies `rule`'s strategy to a whole value (column rules): Redact -> token, Mask -> same
    /// length, Partial, Hash -> hash of the whole value; returns false for Null.
    pub fn apply(&self, rule: usize, value: &[u8], out: &mut Vec<u8>) -> bool {
        self.replace(rule, value, out)
    }

    /// The search loop shared by every entry point: confirmed findings in `hay`, in order, until
    /// `f` returns false. The first stage picks the NUL-delimited values worth searching; each is
    /// then searched alone, which is exact because no pattern matches NUL and NUL is neither a
    /// word byte nor anything else a pattern can look at.
    fn scan(&self, hay: &[u8], f: &mut dyn FnMut(usize, usize, usize) -> bool) {
        let Some(all) = &self.all else { return };
        let mut pos = 0;
        // Start of the gate regex's next candidate at or after `pos` (hay.len(): none left).
        let mut gate_at = 0;
        while pos < hay.len() {
            if gate_at < pos {
                gate_at = match &self.gate {
                    Some(gate) => gate
                        .search(&Input::new(hay).range(pos..))
                        .map_or(hay.len(), |m| m.start()),
                    None => hay.len(),
                };
            }
            let hit = if self.shapes.any() {
                prefilter::next_trigger(&self.shapes, hay, pos, gate_at).unwrap_or(gate_at)
            } else {
                gate_at
            };
            if hit >= hay.len() {
                return;
            }
            let start = memchr::memrchr(0, &hay[pos..hit]).map_or(pos, |i| pos + i + 1);
            let end = memchr::memchr(0, &hay[hit..]).map_or(hay.len(), |i| hit + i);
            if !self.scan_value(all, hay, start, end, f) {
                return;
            }
            pos = end + 1;
        }
    }

    /// Searches the value `hay[start..end]` with every pattern; false once `f` said stop.
    fn scan_value(
        &self,
        all: &Regex,
        hay: &[u8],
        start: usize,
        end: usize,
        f: &mut dyn FnMut(usize, usize, usize) -> bool,
    ) -> bool {
        let value = &hay[start..end];
        let mut at = 0;
        while at < value.len() {
            let Some(m) = all.search(&Input::new(value).range(at..)) else {
                break;
            };
            match self.confirm(value, m.start(), m.end(), m.pattern().as_usize()) {
                Some((s, e, rule)) => {
                    if !f(start + s, start + e, rule) {
                        return false;
                    }
                    at = e;
                }
                None => at = m.start() + 1,
            }
        }
        true
    }

    /// Confirms the candidate `hay[start..end]` of pattern `pid`, or the first later pattern that
    /// matches at `start` and is confirmed. Returns the (possibly narrowed) span and its rule.
    fn confirm(
        &self,
        hay: &[u8],
        start: usize,
        end: usize,
        pid: usize,
    ) -> Option<(usize, usize, usize)> {
        if let Some((s, e)) = self.check(hay, start, end, pid) {
            return Some((s, e, self.pats[pid].rule));
        }
        let input = Input::new(hay).range(start..).anchored(Anchored::Yes);
        for (q, re) in self.single.iter().enumerate().skip(pid + 1) {
            if let Some(m) = re.search(&input) {
                if let Some((s, e)) = self.check(hay, m.start(), m.end(), q) {
                    return Some((s, e, self.pats[q].rule));
                }
            }
        }
        None
    }

    fn check(&self, hay: &[u8], start: usize, end: usize, pid: usize) -> Option<(usize, usize)> {
        let found = match self.pats[pid].check {
            Check::None => Some((start, end)),
            Check::Builtin(check) => check(hay, start, end),
            Check::Custom(valid) => valid(&hay[start..end]).then_some((start, end)),
        };
        found.filter(|&(s, e)| start <= s && s < e && e <= end)
    }
}

/// Checks a custom pattern the way MaskSet::new would (for the policy checker): Ok or a message.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    custom_hir(pattern).and_then(|hir| single_regex(&hir).map(|_| ()))
}

fn builder() -> meta::Builder {
    let mut b = meta::Builder::new();
    b.configure(
        meta::Config::new()
            .match_kind(MatchKind::LeftmostFirst)
            .utf8_empty(false)
            .hybrid_cache_capacity(8 << 20),
    );
    b
}

fn single_regex(hir: &Hir) -> Result<Regex, String> {
    builder()
        .build_from_hir(hir)
        .map_err(|e| format!("pattern cannot be compiled: {e}"))
}

/// Parses a built-in pattern: ASCII classes and boundaries, bytes semantics.
fn builtin_hir(pattern: &str) -> Hir {
    regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .build()
        .parse(pattern)
        .expect("built-in patterns are valid")
}

/// Parses a custom pattern (RE2 syntax, Unicode classes) and enforces the crate's rules: no empty
/// match, no NUL (removed from classes, refused when explicit).
fn custom_hir(pattern: &str) -> Result<Hir, String> {
    let hir = regex_syntax::ParserBuilder::new()
        .utf8(false)
        .nest_limit(100)
        .build()
        .parse(pattern)
        .map_err(|e| format!("invalid pattern: {e}"))?;
    let hir = without_nul(hir)?;
    if hir.properties().minimum_len() == Some(0) {
        return Err("pattern can match the empty string".into());
    }
    Ok(hir)
}

/// Rebuilds `hir` with NUL removed from every class; an explicit NUL (a literal, or a class that
/// matches nothing else) is an error, since values are separated by NUL in batches.
fn without_nul(hir: Hir) -> Result<Hir, String> {
    const NUL: &str = "pattern can match a NUL byte (\\x00)";
    Ok(match hir.into_kind() {
        HirKind::Literal(lit) => {
            if lit.0.contains(&0) {
                return Err(NUL.into());
            }
            Hir::literal(lit.0)
        }
        HirKind::Class(Class::Unicode(mut cls)) => {
            let any = !cls.ranges().is_empty();
            cls.difference(&regex_syntax::hir::ClassUnicode::new([
                regex_syntax::hir::ClassUnicodeRange::new('\0', '\0'),
            ]));
            if any && cls.ranges().is_empty() {
                return Err(NUL.into());
            }
            Hir::class(Class::Unicode(cls))
        }
        HirKind::Class(Class::Bytes(mut cls)) => {
            let any = !cls.ranges().is_empty();
            cls.difference(&regex_syntax::hir::ClassBytes::new([
                regex_syntax::hir::ClassBytesRange::new(0, 0),
            ]));
            if any && cls.ranges().is_empty() {
                return Err(NUL.into());
            }
            Hir::class(Class::Bytes(cls))
        }
        HirKind::Repetition(mut rep) => {
            rep.sub = Box::new(without_nul(*rep.sub)?);
            Hir::repetition(rep)
        }
        HirKind::Capture(mut cap) => {
            cap.sub = Box::new(without_nul(*cap.sub)?);
            Hir::capture(cap)
        }
        HirKind::Concat(subs) => Hir::concat(
            subs.into_iter()
                .map(without_nul)
                .collect::<Result<_, _>>()?,
        ),
        HirKind::Alternation(subs) => Hir::alternation(
            subs.into_iter()
                .map(without_nul)
                .collect::<Result<_, _>>()?,
        ),
        HirKind::Empty => Hir::empty(),
        HirKind::Look(look) => Hir::look(look),
    })
}

/// `hir` with every anchor and boundary assertion replaced by the empty pattern: it matches
/// wherever `hir` does, and more, so it can select values for the full search in a batch where
/// "start of value" is not "start of haystack".
fn without_anchors(hir: Hir) -> Hir {
    match hir.into_kind() {
        HirKind::Look(_) => Hir::empty(),
        HirKind::Repetition(mut rep) => {
            rep.sub = Box::new(without_anchors(*rep.sub));
            Hir::repetition(rep)
        }
        HirKind::Capture(mut cap) => {
            cap.sub = Box::new(without_anchors(*cap.sub));
            Hir::capture(cap)
        }
        HirKind::Concat(subs) => Hir::concat(subs.into_iter().map(without_anchors).collect()),
        HirKind::Alternation(subs) => {
            Hir::alternation(subs.into_iter().map(without_anchors).collect())
        }
        HirKind::Literal(lit) => Hir::literal(lit.0),
        HirKind::Class(cls) => Hir::class(cls),
        HirKind::Empty => Hir::empty(),
    }
}

/// Characters in `s` when it is valid UTF-8, bytes otherwise.
fn char_count(s: &[u8]) -> usize {
    match std::str::from_utf8(s) {
        Ok(s) => s.chars().count(),
        Err(_) => s.len(),
    }
}

fn fill(out: &mut Vec<u8>, ch: u8, n: usize) {
    out.resize(out.len() + n, ch);
}

fn partial(m: &[u8], keep_last: usize, keep_domain: bool, ch: u8, out: &mut Vec<u8>) {
    if keep_domain {
        if let Some(at) = memchr::memrchr(b'@', m) {
            fill(out, ch, char_count(&m[..at]));
            out.extend_from_slice(&m[at..]);
            return;
        }
    }
    // Byte offset where the kept tail starts, and how many characters precede it.
    let (split, masked) = match std::str::from_utf8(m) {
        Ok(s) => {
            let n = s.chars().count();
            if n <= keep_last {
                (m.len(), n)
            } else {
                let (i, _) = s.char_indices().nth(n - keep_last).expect("n > keep_last");
                (i, n - keep_last)
            }
        }
        Err(_) if m.len() <= keep_last => (m.len(), m.len()),
        Err(_) => (m.len() - keep_last, m.len() - keep_last),
    };
    fill(out, ch, masked);
    out.extend_from_slice(&m[split..]);
}

fn hash(key: &[u8], m: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(m);
    let digest = mac.finalize().into_bytes();
    for &b in &digest[..16] {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 15)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two-stage search must find exactly what the full search finds on every value.
    #[test]
    fn first_stage_never_loses_a_finding() {
        let set = MaskSet::new(vec![RuleSpec {
            name: "all".into(),
            detectors: detectors::BUILTINS.iter().map(|s| s.to_string()).collect(),
            pattern: None,
            validator: None,
            strategy: Strategy::Null,
        }])
        .unwrap();
        let parts: &[&[u8]] = &[
            b"4111 1111 1111 1111",
            b"4111111111111111",
            b"378282246310005",
            b"3782 822463 10005",
            b"a.b@example.com",
            b"123-45-6789",
            b"123 45 6789",
            b"DE89 3704 0044 0532 0130 00",
            b"NL91ABNA0417164300",
            b"+44 20 7946 0958",
            b"+14155552671",
            b"(555) 123-4567",
            b"555.123.4567",
            b"10.0.0.1",
            b"2001:db8::1",
            b"1:2:3:4:5:6:7:8",
            b"::1",
            b"AKIAIOSFODNN7EXAMPLE",
            b"glpat-abcdefghij0123456789",
            b" ",
            b"-",
            b".",
            b":",
            b"\0",
            b"x",
            b"7",
            b"2026-11-29 21:04:05",
            b"12.50",
            b"\n",
            b"(",
        ];
        let mut x: u64 = 7;
        for round in 0..4000 {
            let mut hay = Vec::new();
            for _ in 0..(round % 12) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                hay.extend_from_slice(parts[(x >> 33) as usize % parts.len()]);
            }
            let mut staged = Vec::new();
            set.find_matches(&hay, |s, e, r| staged.push((s, e, r)));
            let mut full = Vec::new();
            let mut start = 0;
            for value in hay.split(|&b| b == 0) {
                let end = start + value.len();
                set.scan_value(
                    set.all.as_ref().unwrap(),
                    &hay,
                    start,
                    end,
                    &mut |s, e, r| {
                        full.push((s, e, r));
                        true
                    },
                );
                start = end + 1;
            }
            assert_eq!(staged, full, "{:?}", String::from_utf8_lossy(&hay));
        }
    }
}
