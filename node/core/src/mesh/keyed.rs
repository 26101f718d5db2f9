//! Per-name tables updated on every request (in-flight counts, latency, failures, pools):
//! `entry(name.to_string())` would allocate a key each time although the name is there
//! after its first request.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// The value under `key`, made by `make` (and the key copied) only when absent.
pub fn at<'a, V, S: BuildHasher>(map: &'a mut HashMap<String, V, S>, key: &str, make: impl FnOnce() -> V) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), make());
    }
    map.get_mut(key).expect("present or just inserted")
}

/// [`at`] for a sorted map.
pub fn at_sorted<'a, V>(map: &'a mut BTreeMap<String, V>, key: &str, make: impl FnOnce() -> V) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), make());
    }
    map.get_mut(key).expect("present or just inserted")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_value_is_made_once_and_then_found() {
        let mut m = std::collections::HashMap::new();
        *super::at(&mut m, "a", || 1) += 10;
        *super::at(&mut m, "a", || 100) += 1;
        assert_eq!(m["a"], 12);
        assert_eq!(m.len(), 1);
    }
}
