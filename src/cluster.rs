//! Cluster YAML (being written).
