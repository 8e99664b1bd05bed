//! Building blocks of a Prometheus text-format page, shared by the director's `/metrics` and a
//! real server's `xlb realserver metrics`.

use std::fmt::Write;

use anyhow::{Result, ensure};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

/// One metric family, filled sample by sample. The page is built on the `prometheus` crate's
/// data model directly rather than through registered metric vectors: with 10,000 reals those
/// cost a hash lookup per sample and a sort per family, ten times the time of the rest of a
/// scrape.
pub struct Family {
    family: MetricFamily,
    /// Each series' text up to its value (`name{label="value",...} `), written when its labels
    /// change: a scrape then writes only the values (see `Page::encode`).
    prefixes: Vec<String>,
    /// Samples added in this scrape: the first `samples` series of `family`. The series after
    /// them are the last scrape's, kept for reuse until the page is encoded.
    samples: usize,
    /// The family's text in the last page, written again only if this scrape `changed` a
    /// series (its labels or value) or the number of series: most gauges (weights, states)
    /// stay as they were from one scrape to the next.
    text: String,
    changed: bool,
}

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut family = MetricFamily::default();
        family.set_name(name.into());
        family.set_help(help.into());
        family.set_field_type(kind);
        Family {
            family,
            prefixes: Vec::new(),
            samples: 0,
            text: String::new(),
            changed: true,
        }
    }

    /// Adds a sample; label names in alphabetical order, as registries print them. The series
    /// the last scrape had at this position is overwritten in place: its labels are replaced
    /// only where they differ, so a scrape of an unchanged configuration allocates nothing
    /// per sample (110,000 series at 1,000 services x 10 reals).
    pub fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let i = self.samples;
        self.samples += 1;
        let counter = self.family.get_field_type() == MetricType::COUNTER;
        let metrics = self.family.mut_metric();
        let new = i == metrics.len();
        if new {
            metrics.push(Metric::default());
            self.prefixes.push(String::new());
        }
        let m = &mut metrics[i];
        let last = if counter {
            m.get_counter().get_value()
        } else {
            m.get_gauge().get_value()
        };
        // Bit for bit, so that a NaN that stays NaN is no change.
        if new || last.to_bits() != value.to_bits() {
            self.changed = true;
            if counter {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            } else {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        if set_labels(m, labels) || new {
            self.changed = true;
            let prefix = &mut self.prefixes[i];
            prefix.clear();
            write_prefix(
                prefix,
                self.family.name(),
                self.family.get_metric()[i].get_label(),
            );
        }
    }

    /// Writes the family's text (`# HELP`, `# TYPE`, a line per series) into `self.text`.
    fn write_text(&mut self) {
        let text = &mut self.text;
        text.clear();
        let name = self.family.name();
        let help = self.family.help();
        if !help.is_empty() {
            text.push_str("# HELP ");
            text.push_str(name);
            text.push(' ');
            escape(text, help, false);
            text.push('\n');
        }
        text.push_str("# TYPE ");
        text.push_str(name);
        let counter = self.family.get_field_type() == MetricType::COUNTER;
        text.push_str(if counter { " counter\n" } else { " gauge\n" });
        for (prefix, m) in self.prefixes.iter().zip(self.family.get_metric()) {
            text.push_str(prefix);
            let value = if counter {
                m.get_counter().get_value()
            } else {
                m.get_gauge().get_value()
            };
            write_value(text, value);
            text.push('\n');
        }
    }
}

/// Makes `m`'s labels `labels`; whether they changed.
fn set_labels(m: &mut Metric, labels: &[(&str, &str)]) -> bool {
    let same_names = m.get_label().len() == labels.len()
        && m.get_label()
            .iter()
            .zip(labels)
            .all(|(l, (k, _))| l.name() == *k);
    if !same_names {
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name((*k).into());
                    l.set_value((*v).into());
                    l
                })
                .collect(),
        );
        return true;
    }
    let mut changed = false;
    for (l, (_, v)) in m.mut_label().iter_mut().zip(labels) {
        if l.value() != *v {
            l.set_value((*v).into());
            changed = true;
        }
    }
    changed
}

/// A series' text before its value, as the crate's `TextEncoder` writes it: the name, the
/// labels (if any) with `\`, newline and `"` escaped, and a space.
fn write_prefix(out: &mut String, name: &str, labels: &[LabelPair]) {
    out.push_str(name);
    for (i, l) in labels.iter().enumerate() {
        out.push(if i == 0 { '{' } else { ',' });
        out.push_str(l.name());
        out.push_str("=\"");
        escape(out, l.value(), true);
        out.push('"');
    }
    if !labels.is_empty() {
        out.push('}');
    }
    out.push(' ');
}

/// Appends `text` with `\` and newline escaped, and `"` too if `quote` (label values).
fn escape(out: &mut String, text: &str, quote: bool) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Appends `value` as `f64`'s `Display` (what the crate's encoder writes) does. Counts below
/// 2^53 are integers whose shortest decimal is their own digits: written as an integer, which
/// is several times quicker than the float path.
fn write_value(out: &mut String, value: f64) {
    const EXACT: f64 = (1u64 << 53) as f64;
    if value.fract() == 0.0 && value.abs() < EXACT && !(value == 0.0 && value.is_sign_negative()) {
        if value < 0.0 {
            out.push('-');
        }
        let mut n = value.abs() as u64;
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
    } else {
        let _ = write!(out, "{value}");
    }
}

/// The families of a page, kept from one scrape to the next so that their series are reused
/// (see `Family::add`). A scrape takes each family with `counter` or `gauge`, adds its
/// samples, and hands them all back, in page order, to `encode`.
#[derive(Default)]
pub struct Page {
    kept: Vec<Family>,
    /// The last page's length: the next one is written without growing its buffer.
    last_len: usize,
}

impl Page {
    pub fn counter(&mut self, name: &str, help: &str) -> Family {
        self.take(name, help, MetricType::COUNTER)
    }

    pub fn gauge(&mut self, name: &str, help: &str) -> Family {
        self.take(name, help, MetricType::GAUGE)
    }

    fn take(&mut self, name: &str, help: &str, kind: MetricType) -> Family {
        match self.kept.iter().position(|f| f.family.name() == name) {
            Some(i) => {
                let mut f = self.kept.swap_remove(i);
                f.samples = 0;
                f.changed = false;
                f
            }
            None => Family::new(name, help, kind),
        }
    }

    /// The text page of `families`, in that order, and keeps them for the next scrape. A family
    /// without samples (no service yet, no checked real) is left out, as a registry leaves out
    /// a vector with no children. The text is byte for byte what the crate's `TextEncoder`
    /// writes for the same families (a unit test compares): each family's text is its last one
    /// if nothing in it changed, else written again from its series' kept prefixes and values.
    pub fn encode(&mut self, families: impl IntoIterator<Item = Family>) -> Result<String> {
        let mut page = String::with_capacity(self.last_len);
        let mut sampled = Vec::new();
        let mut empty = Vec::new();
        for mut f in families {
            if f.family.get_metric().len() != f.samples {
                f.changed = true;
                f.family.mut_metric().truncate(f.samples);
                f.prefixes.truncate(f.samples);
            }
            if f.samples == 0 {
                empty.push(f);
                continue;
            }
            ensure!(
                !f.family.name().is_empty(),
                "a metric family without a name"
            );
            if f.changed {
                f.write_text();
            }
            page.push_str(&f.text);
            sampled.push(f);
        }
        self.last_len = page.len();
        sampled.append(&mut empty);
        self.kept = sampled;
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use prometheus::TextEncoder;

    use super::*;

    /// One scrape of a page: `reals` (address, state, value), a family whose label set varies
    /// and one that is present for some reals only. The page's text, and the crate's
    /// `TextEncoder` text of the same families.
    fn scrape(page: &mut Page, reals: &[(&str, &str, f64)]) -> (String, String) {
        let mut packets = page.counter("t_packets_total", "Packets.\nSee \\docs.");
        let mut state = page.gauge("t_state", "State.");
        let mut latency = page.gauge("t_latency_seconds", "Latency.");
        let mut none = page.gauge("t_none", "Never sampled.");
        for (addr, st, value) in reals {
            packets.add(&[("real", addr)], *value);
            state.add(&[("real", addr), ("state", st)], 1.0);
            if *st == "up" {
                latency.add(&[("real", addr)], value / 10.0);
            }
        }
        if reals.is_empty() {
            none.add(&[], 1.0);
        }
        let text = page
            .encode([packets, state, latency, none])
            .expect("a page of named families");
        let families: Vec<MetricFamily> = page
            .kept
            .iter()
            .map(|f| f.family.clone())
            .filter(|f| !f.get_metric().is_empty())
            .collect();
        let mut by_crate = String::new();
        TextEncoder::new()
            .encode_utf8(&families, &mut by_crate)
            .expect("the crate encodes the same families");
        (text, by_crate)
    }

    /// A page kept across scrapes prints exactly what a fresh one does and what the crate's
    /// encoder prints for the same families, whatever changed in between: values (integers,
    /// fractions, counts past 2^53, -0), a label's value, escaped characters, series coming,
    /// going and shifting position.
    #[test]
    fn a_kept_page_prints_what_a_fresh_one_and_the_crate_do() {
        let scrapes: [&[(&str, &str, f64)]; 8] = [
            &[("a", "up", 1.0), ("b", "down", 2.0), ("c", "up", 3.0)],
            // Nothing changed: every family's last text is reused.
            &[("a", "up", 1.0), ("b", "down", 2.0), ("c", "up", 3.0)],
            // One value changed: the packets family is written again, state and latency
            // are not (latency of "c" is 0.3 either way).
            &[("a", "up", 1.0), ("b", "down", 2.5), ("c", "up", 3.0)],
            &[("a", "up", 4.0), ("b", "up", 5.0), ("c", "up", 6.0)],
            &[("a", "down", 4.0), ("c", "draining", 7.0)],
            &[],
            &[
                ("d", "up", 8.0),
                ("a", "up", 1.5),
                ("b", "down", 2.0),
                ("c", "up", 3.0),
            ],
            &[
                ("d", "up", 9_007_199_254_740_993.0),
                ("a\"\\\n", "up", 1_152_921_504_606_846_976.0),
                ("b", "up", -0.0),
                ("c", "up", 1e-7),
                ("e", "down", f64::INFINITY),
                ("f", "down", f64::NAN),
                ("g", "up", 123_456_789.0),
            ],
        ];
        let mut kept = Page::default();
        // The last twice: a NaN that stays NaN is no change either.
        for reals in scrapes.iter().chain(&scrapes[7..]) {
            let (fresh, _) = scrape(&mut Page::default(), reals);
            let (text, by_crate) = scrape(&mut kept, reals);
            assert_eq!(text, fresh);
            assert_eq!(text, by_crate);
        }
        let (last, _) = scrape(&mut Page::default(), scrapes[6]);
        assert!(
            last.contains("t_state{real=\"d\",state=\"up\"} 1\n"),
            "{last}"
        );
        assert!(
            last.contains("t_latency_seconds{real=\"a\"} 0.15\n"),
            "{last}"
        );
        assert!(
            last.contains("# HELP t_packets_total Packets.\\nSee \\\\docs.\n"),
            "{last}"
        );
        assert!(!last.contains("t_none"), "{last}");
        let (odd, _) = scrape(&mut Page::default(), scrapes[7]);
        assert!(
            odd.contains("t_packets_total{real=\"a\\\"\\\\\\n\"} 1152921504606847000\n"),
            "{odd}"
        );
        assert!(odd.contains("t_packets_total{real=\"b\"} -0\n"), "{odd}");
    }
}
