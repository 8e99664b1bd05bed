//! Building blocks of a Prometheus text-format page, shared by the director's `/metrics` and a
//! real server's `xlb realserver metrics`.

use anyhow::Result;
use prometheus::{
    TextEncoder,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

/// One metric family, filled sample by sample. The page is built on the `prometheus` crate's
/// data model and encoder directly rather than through registered metric vectors: with
/// 10,000 reals those cost a hash lookup per sample and a sort per family, ten times the
/// time of the rest of a scrape.
pub struct Family {
    family: MetricFamily,
    /// Samples added in this scrape: the first `samples` series of `family`. The series after
    /// them are the last scrape's, kept for reuse until the page is encoded.
    samples: usize,
}

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut family = MetricFamily::default();
        family.set_name(name.into());
        family.set_help(help.into());
        family.set_field_type(kind);
        Family { family, samples: 0 }
    }

    /// Adds a sample; label names in alphabetical order, as registries print them. The series
    /// the last scrape had at this position is overwritten in place: its labels are replaced
    /// only where they differ, so a scrape of an unchanged configuration allocates nothing
    /// per sample (110,000 series at 1,000 services x 10 reals).
    pub fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let kind = self.family.get_field_type();
        let metrics = self.family.mut_metric();
        if self.samples == metrics.len() {
            metrics.push(Metric::default());
        }
        let m = &mut metrics[self.samples];
        self.samples += 1;
        set_labels(m, labels);
        if kind == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
    }
}

fn set_labels(m: &mut Metric, labels: &[(&str, &str)]) {
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
        return;
    }
    for (l, (_, v)) in m.mut_label().iter_mut().zip(labels) {
        if l.value() != *v {
            l.set_value((*v).into());
        }
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
                f
            }
            None => Family::new(name, help, kind),
        }
    }

    /// The text page of `families`, in that order, and keeps them for the next scrape. A family
    /// without samples (no service yet, no checked real) is left out, as a registry leaves out
    /// a vector with no children.
    pub fn encode(&mut self, families: impl IntoIterator<Item = Family>) -> Result<String> {
        let (sampled, empty): (Vec<MetricFamily>, Vec<MetricFamily>) = families
            .into_iter()
            .map(|mut f| {
                f.family.mut_metric().truncate(f.samples);
                f.family
            })
            .partition(|f| !f.get_metric().is_empty());
        let mut text = String::with_capacity(self.last_len);
        TextEncoder::new().encode_utf8(&sampled, &mut text)?;
        self.last_len = text.len();
        self.kept = sampled
            .into_iter()
            .chain(empty)
            .map(|family| Family { family, samples: 0 })
            .collect();
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One scrape of a page: `reals` (address, state, value), a family whose label set varies
    /// and one that is present for some reals only.
    fn scrape(page: &mut Page, reals: &[(&str, &str, f64)]) -> String {
        let mut packets = page.counter("t_packets_total", "Packets.");
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
        page.encode([packets, state, latency, none]).unwrap()
    }

    /// A page kept across scrapes prints exactly what a fresh one does, whatever changed in
    /// between: values, a label's value, series coming, going and shifting position.
    #[test]
    fn a_kept_page_prints_what_a_fresh_one_does() {
        let scrapes: [&[(&str, &str, f64)]; 5] = [
            &[("a", "up", 1.0), ("b", "down", 2.0), ("c", "up", 3.0)],
            &[("a", "up", 4.0), ("b", "up", 5.0), ("c", "up", 6.0)],
            &[("a", "down", 4.0), ("c", "draining", 7.0)],
            &[],
            &[
                ("d", "up", 8.0),
                ("a", "up", 1.5),
                ("b", "down", 2.0),
                ("c", "up", 3.0),
            ],
        ];
        let mut kept = Page::default();
        for reals in scrapes {
            let fresh = scrape(&mut Page::default(), reals);
            assert_eq!(scrape(&mut kept, reals), fresh);
        }
        let last = scrape(&mut Page::default(), scrapes[4]);
        assert!(
            last.contains("t_state{real=\"d\",state=\"up\"} 1\n"),
            "{last}"
        );
        assert!(
            last.contains("t_latency_seconds{real=\"a\"} 0.15\n"),
            "{last}"
        );
        assert!(!last.contains("t_none"), "{last}");
    }
}
