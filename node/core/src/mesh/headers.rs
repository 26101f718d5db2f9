//! A request's headers as routing and authorization read them: the shell hands over its
//! own header map (behind this trait) instead of copying every header into strings.

/// Header lookup by name, without regard to case.
pub trait Headers {
    /// Does any value of the header `name` satisfy `f`?
    fn any(&self, name: &str, f: &mut dyn FnMut(&str) -> bool) -> bool;
}

fn any_pair(pairs: &[(String, String)], name: &str, f: &mut dyn FnMut(&str) -> bool) -> bool {
    pairs.iter().any(|(k, v)| k.eq_ignore_ascii_case(name) && f(v))
}

impl Headers for Vec<(String, String)> {
    fn any(&self, name: &str, f: &mut dyn FnMut(&str) -> bool) -> bool {
        any_pair(self, name, f)
    }
}

impl<const N: usize> Headers for [(String, String); N] {
    fn any(&self, name: &str, f: &mut dyn FnMut(&str) -> bool) -> bool {
        any_pair(self, name, f)
    }
}

#[cfg(test)]
mod tests {
    use super::Headers;

    #[test]
    fn names_match_without_case_and_every_value_counts() {
        let h = vec![("X-Env".to_string(), "dev".to_string()), ("x-env".to_string(), "prod".to_string())];
        assert!(h.any("x-env", &mut |v| v == "prod"));
        assert!(h.any("X-ENV", &mut |v| v == "dev"));
        assert!(!h.any("x-user", &mut |_| true));
        assert!(![].any("x-env", &mut |_| true));
    }
}
