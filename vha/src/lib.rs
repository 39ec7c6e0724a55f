//! vha: keeping VMs alive when hosts fail (HA).
//!
//! Failure and isolation detection, fencing, and restarting VMs elsewhere, never twice.
//! Knows nothing of KVM. Filled in by the HA issue.
#![deny(missing_docs, missing_debug_implementations)]
