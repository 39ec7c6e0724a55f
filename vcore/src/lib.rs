//! vcore: one KVM VM on one host.
#![deny(missing_docs, missing_debug_implementations)]
