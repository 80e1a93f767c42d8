//! Label selectors, shared with the LoadBalancer side: see `palisade-labels`.
pub use palisade_labels::{
    any_matches, Labels, NamespaceLabels, Op, Requirement, Selector, SelectorError,
    NAMESPACE_NAME_LABEL,
};
