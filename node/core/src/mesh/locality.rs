//! Locality: prefer endpoints in the caller's zone, then its region, then anywhere, so
//! traffic stays close while the near endpoints last and fails over outward when they do
//! not.

/// Where an endpoint (or the caller) runs: its `zone` and `region` labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Place<'a> {
    pub zone: Option<&'a str>,
    pub region: Option<&'a str>,
}

impl<'a> Place<'a> {
    /// The place `labels` name, each label falling back to `fallback`'s (an instance's own
    /// labels, then its node's).
    pub fn of_labels(
        labels: &'a std::collections::BTreeMap<String, String>,
        fallback: Option<&'a std::collections::BTreeMap<String, String>>,
    ) -> Place<'a> {
        let get = |k: &str| labels.get(k).or_else(|| fallback.and_then(|l| l.get(k))).map(String::as_str);
        Place { zone: get("zone"), region: get("region") }
    }
}

/// The indexes of `endpoints` to choose from: the closest non-empty tier.
pub fn nearest(me: Place<'_>, endpoints: &[Place<'_>]) -> Vec<usize> {
    let tier = |same: &dyn Fn(&Place<'_>) -> bool| -> Vec<usize> {
        endpoints.iter().enumerate().filter(|(_, p)| same(p)).map(|(i, _)| i).collect()
    };
    if me.zone.is_some() {
        let v = tier(&|p| p.zone == me.zone);
        if !v.is_empty() {
            return v;
        }
    }
    if me.region.is_some() {
        let v = tier(&|p| p.region == me.region);
        if !v.is_empty() {
            return v;
        }
    }
    (0..endpoints.len()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_takes_its_own_labels_then_its_nodes() {
        let labels = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (own, node) = (labels(&[("zone", "a")]), labels(&[("zone", "b"), ("region", "eu")]));
        assert_eq!(Place::of_labels(&own, Some(&node)), Place { zone: Some("a"), region: Some("eu") });
        assert_eq!(Place::of_labels(&own, None), Place { zone: Some("a"), region: None });
    }

    fn p<'a>(zone: &'a str, region: &'a str) -> Place<'a> {
        Place { zone: Some(zone), region: Some(region) }
    }

    #[test]
    fn same_zone_first_then_region_then_anywhere() {
        let me = p("eu-1a", "eu-1");
        let all = [p("eu-1a", "eu-1"), p("eu-1b", "eu-1"), p("us-1a", "us-1")];
        assert_eq!(nearest(me, &all), vec![0]);
        assert_eq!(nearest(me, &all[1..]), vec![0], "zone gone: the same region");
        assert_eq!(nearest(me, &all[2..]), vec![0], "region gone: anywhere");
        assert_eq!(nearest(Place::default(), &all), vec![0, 1, 2], "a caller without labels uses all");
    }
}
