//! List filters of the CRI: by id (exact or unique prefix, as crictl sends), state, pod and
//! labels.

use std::collections::HashMap;

/// Whether every `selector` pair is in `labels`.
pub fn labels_match(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `id` passes an id filter (empty: everything; otherwise exact or prefix).
pub fn id_matches(filter: &str, id: &str) -> bool {
    filter.is_empty() || id.starts_with(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors() {
        let labels: HashMap<String, String> =
            [("app".to_string(), "web".to_string()), ("tier".into(), "fe".into())].into();
        assert!(labels_match(&HashMap::new(), &labels));
        assert!(labels_match(&[("app".to_string(), "web".to_string())].into(), &labels));
        assert!(!labels_match(&[("app".to_string(), "db".to_string())].into(), &labels));
        assert!(!labels_match(&[("x".to_string(), "y".to_string())].into(), &labels));
    }

    #[test]
    fn ids() {
        assert!(id_matches("", "abc"));
        assert!(id_matches("ab", "abc"));
        assert!(id_matches("abc", "abc"));
        assert!(!id_matches("b", "abc"));
    }
}
