//! Consistent hashing: each server owns many points on a ring of 64-bit hashes; a key
//! goes to the first point at or after its own hash. Adding a server takes over about
//! 1/N of the keys and moves no others.

use std::collections::BTreeMap;

/// Points per server: enough for an even spread over a handful of servers.
const POINTS: u32 = 160;

#[derive(Debug, Clone)]
pub(crate) struct Ring {
    points: BTreeMap<u64, usize>,
    /// How many servers the ring spreads keys over.
    servers: usize,
}

/// A stable 64-bit hash (FNV-1a then a finaliser): the same on every replica and
/// every run, which `std`'s randomly seeded hasher is not.
pub(crate) fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser, to spread FNV's weak low bits.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Ring {
    /// A ring over servers named `names` (their index is what `server_for` returns).
    pub fn new(names: &[String]) -> Self {
        let mut points = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            for p in 0..POINTS {
                points.insert(hash(format!("{name}#{p}").as_bytes()), i);
            }
        }
        Ring {
            points,
            servers: names.len(),
        }
    }

    /// The index of the server that owns `key`.
    pub fn server_for(&self, key: &[u8]) -> usize {
        if self.servers <= 1 {
            // One server owns every key: nothing to hash.
            return 0;
        }
        let h = hash(key);
        self.points
            .range(h..)
            .next()
            .or_else(|| self.points.iter().next())
            .map_or(0, |(_, i)| *i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:11211")).collect()
    }

    #[test]
    fn spreads_keys_and_adding_a_server_moves_about_one_nth() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("flags:flag-{i}")).collect();
        let four = Ring::new(&names(4));
        let mut counts = [0usize; 4];
        for k in &keys {
            counts[four.server_for(k.as_bytes())] += 1;
        }
        for c in counts {
            // 5,000 each on average; allow ±30 %.
            assert!((3_500..=6_500).contains(&c), "{counts:?}");
        }
        let five = Ring::new(&names(5));
        let moved = keys
            .iter()
            .filter(|k| four.server_for(k.as_bytes()) != five.server_for(k.as_bytes()))
            .count();
        // Ideally 1/5 = 4,000; every moved key moved to the new server.
        assert!((2_800..=5_200).contains(&moved), "moved {moved}");
        for k in &keys {
            let (a, b) = (four.server_for(k.as_bytes()), five.server_for(k.as_bytes()));
            assert!(a == b || b == 4, "a key moved between old servers");
        }
    }

    #[test]
    fn three_to_four_servers_moves_a_quarter_give_or_take_ten_points() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("flags:k{i}")).collect();
        let (three, four) = (Ring::new(&names(3)), Ring::new(&names(4)));
        let mut counts = [0usize; 3];
        for k in &keys {
            counts[three.server_for(k.as_bytes())] += 1;
        }
        assert!(
            counts.iter().all(|c| *c > 4_000),
            "all three used: {counts:?}"
        );
        let moved = keys
            .iter()
            .filter(|k| three.server_for(k.as_bytes()) != four.server_for(k.as_bytes()))
            .count();
        let share = moved as f64 / keys.len() as f64;
        assert!(
            (0.15..=0.35).contains(&share),
            "moved {:.1} %",
            share * 100.0
        );
    }

    #[test]
    fn the_hash_is_stable_across_runs() {
        assert_eq!(hash(b"flags:checkout"), hash(b"flags:checkout"));
        assert_ne!(hash(b"a"), hash(b"b"));
        assert_eq!(Ring::new(&names(1)).server_for(b"anything"), 0);
    }
}
