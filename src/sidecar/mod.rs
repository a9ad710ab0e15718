//! apiserver-proxy-sidecar (placeholder, being written).
