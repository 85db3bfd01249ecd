//! Throughput of the masking engine with every built-in detector on, on one core.
//!
//! Run with `cargo run -p ostiary-mask --release --example throughput [MiB]`. Generates two
//! deterministic corpora of CSV-ish result values joined by NUL (names, cities, products,
//! timestamps, ids, decimals, UUIDs): one with no findings at all, one where about 5 % of rows
//! carry an email, card, SSN, phone number or IP address. Prints MB/s (10^6 bytes per second) for
//! `find_matches` over the whole batch and for `mask_text` value by value.

use std::time::Instant;

use ostiary_mask::{detectors::BUILTINS, MaskSet, RuleSpec, Strategy};

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const FIRST: &[&str] = &[
    "Olivia", "Liam", "Emma", "Noah", "Amélie", "Jürgen", "Sofia", "Mateo", "Chloé", "Hiroshi",
    "Ana", "Lucas", "Zoë", "Ivan", "Fatima", "Oscar",
];
const LAST: &[&str] = &[
    "Smith",
    "García",
    "Müller",
    "Rossi",
    "Dubois",
    "Tanaka",
    "Nowak",
    "Silva",
    "Johansson",
    "O'Brien",
    "Kowalski",
    "Nguyen",
    "Brown",
    "Martin",
];
const CITY: &[&str] = &[
    "Lisbon",
    "São Paulo",
    "New York",
    "Zürich",
    "Kraków",
    "Osaka",
    "Austin",
    "Lyon",
    "Berlin",
    "Toronto",
    "Melbourne",
    "Nairobi",
];
const PRODUCT: &[&str] = &[
    "wireless mouse",
    "USB-C cable 2m",
    "ergonomic chair",
    "standing desk",
    "espresso beans 1kg",
    "running shoes",
    "noise cancelling headphones",
    "4K monitor 27\"",
    "mechanical keyboard",
    "yoga mat",
];
const STATUS: &[&str] = &["shipped", "pending", "delivered", "returned", "cancelled"];

fn uuid(r: &mut Lcg, out: &mut String) {
    let hex = b"0123456789abcdef";
    for (i, n) in [8, 4, 4, 4, 12].iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for _ in 0..*n {
            out.push(hex[r.below(16) as usize] as char);
        }
    }
}

fn finding(r: &mut Lcg) -> &'static str {
    r.pick(&[
        "olivia.smith@example.com",
        "4111 1111 1111 1111",
        "5555555555554444",
        "123-45-6789",
        "+44 20 7946 0958",
        "(555) 123-4567",
        "10.20.30.40",
        "j.doe+orders@mail.example.co.uk",
    ])
}

/// Values joined by NUL, ~`size` bytes; every row has 9 values.
fn corpus(size: usize, with_findings: bool) -> Vec<u8> {
    let mut r = Lcg(42);
    let mut s = String::with_capacity(size + 256);
    let mut row = 0u64;
    while s.len() < size {
        row += 1;
        let hit = with_findings && row.is_multiple_of(20);
        s.push_str(&format!("{}\0", 100000 + r.below(900000)));
        s.push_str(&format!("{} {}\0", r.pick(FIRST), r.pick(LAST)));
        s.push_str(r.pick(CITY));
        s.push('\0');
        s.push_str(r.pick(PRODUCT));
        s.push('\0');
        s.push_str(&format!(
            "2026-{:02}-{:02} {:02}:{:02}:{:02}\0",
            1 + r.below(12),
            1 + r.below(28),
            r.below(24),
            r.below(60),
            r.below(60)
        ));
        s.push_str(&format!("{}.{:02}\0", r.below(10000), r.below(100)));
        uuid(&mut r, &mut s);
        s.push('\0');
        s.push_str(r.pick(STATUS));
        s.push('\0');
        if hit {
            s.push_str(&format!("note: contact {} asap", finding(&mut r)));
        } else {
            s.push_str(&format!("qty {} of {}", 1 + r.below(20), r.pick(PRODUCT)));
        }
        s.push('\0');
    }
    s.into_bytes()
}

fn mbps(bytes: usize, f: impl Fn() -> usize) -> (f64, usize) {
    let mut best = f64::MAX;
    let mut n = 0;
    for _ in 0..3 {
        let t = Instant::now();
        n = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (bytes as f64 / best / 1e6, n)
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    let t = Instant::now();
    let set = MaskSet::new(vec![RuleSpec {
        name: "pii".into(),
        detectors: BUILTINS.iter().map(|s| s.to_string()).collect(),
        pattern: None,
        validator: None,
        strategy: Strategy::Redact {
            token: "****".into(),
        },
    }])
    .expect("built-ins compile");
    println!("compile: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    for (label, with) in [("no findings", false), ("5% rows with findings", true)] {
        let hay = corpus(mib << 20, with);
        let (find, n) = mbps(hay.len(), || {
            let mut n = 0;
            set.find_matches(&hay, |_, _, _| n += 1);
            n
        });
        let (mask, changed) = mbps(hay.len(), || {
            let mut out = Vec::with_capacity(1024);
            let mut counts = [0u64];
            let mut changed = 0;
            for value in hay.split(|&b| b == 0) {
                out.clear();
                if set.mask_text(value, &mut out, &mut counts) != ostiary_mask::Outcome::Unchanged {
                    changed += 1;
                }
            }
            changed
        });
        println!(
            "{label:>22}: {:.0} MiB, find_matches {find:.0} MB/s ({n} findings), \
             mask_text per value {mask:.0} MB/s ({changed} values changed)",
            hay.len() as f64 / (1 << 20) as f64
        );
    }
}
