//! Health of a real as its checks report it: keepalived's rise/fall hysteresis.
//!
//! A real starts `Unknown` and is not given new flows until its first check answers (the first
//! check runs at once, so a healthy real joins within one round trip); the first result decides
//! directly. After that it takes `rise` consecutive successes to go up and `fall` consecutive
//! failures to go down, so one lost probe does not move flows and a flapping real is not
//! readmitted before it has been steady for `rise` checks.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Unknown,
    Up,
    Down,
}

/// The hysteresis state of one real's checks.
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    health: Health,
    /// Consecutive results disagreeing with `health` so far.
    streak: u32,
}

impl Tracker {
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            health: Health::Unknown,
            streak: 0,
        }
    }

    /// A tracker that starts from a known health (`Unknown` is a fresh start).
    pub fn resume(rise: u32, fall: u32, health: Health) -> Self {
        Self {
            health,
            ..Self::new(rise, fall)
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Down at once, whatever the streak (a real that refused connections): it takes `rise`
    /// successes to come back, as after `fall` failures. Returns whether it changed.
    pub fn force_down(&mut self) -> bool {
        let changed = self.health != Health::Down;
        self.health = Health::Down;
        self.streak = 0;
        changed
    }

    /// Records one check result; returns the new health if it changed.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        let (target, needed) = match (self.health, ok) {
            (Health::Unknown, true) => (Health::Up, 1),
            (Health::Unknown, false) => (Health::Down, 1),
            (Health::Up, true) | (Health::Down, false) => {
                self.streak = 0;
                return None;
            }
            (Health::Down, true) => (Health::Up, self.rise),
            (Health::Up, false) => (Health::Down, self.fall),
        };
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.health = target;
        Some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(t: &mut Tracker, results: &str) -> Vec<Health> {
        results
            .chars()
            .map(|c| {
                t.record(c == '+');
                t.health()
            })
            .collect()
    }

    #[test]
    fn the_first_result_decides() {
        let mut up = Tracker::new(2, 3);
        assert_eq!(up.health(), Health::Unknown);
        assert_eq!(up.record(true), Some(Health::Up));
        let mut down = Tracker::new(2, 3);
        assert_eq!(down.record(false), Some(Health::Down));
    }

    #[test]
    fn fall_consecutive_failures_take_a_real_down() {
        let mut t = Tracker::new(2, 3);
        t.record(true);
        use Health::*;
        // Two failures, a success (resets the streak), then three failures.
        assert_eq!(feed(&mut t, "--+---"), [Up, Up, Up, Up, Up, Down]);
    }

    #[test]
    fn a_flapping_real_is_not_readmitted_before_rise_successes() {
        let mut t = Tracker::new(3, 1);
        t.record(false);
        use Health::*;
        assert_eq!(
            feed(&mut t, "++-++-+++"),
            [Down, Down, Down, Down, Down, Down, Down, Down, Up]
        );
    }

    #[test]
    fn forced_down_takes_rise_successes_to_come_back() {
        let mut t = Tracker::new(3, 2);
        t.record(true);
        t.record(true);
        assert!(t.force_down());
        assert!(!t.force_down());
        use Health::*;
        assert_eq!(feed(&mut t, "++-+++"), [Down, Down, Down, Down, Down, Up]);
    }

    #[test]
    fn rise_and_fall_of_zero_act_as_one() {
        let mut t = Tracker::new(0, 0);
        t.record(true);
        assert_eq!(t.record(false), Some(Health::Down));
        assert_eq!(t.record(true), Some(Health::Up));
    }
}
