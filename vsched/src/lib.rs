//! vsched: deciding where VMs run in a cluster (DRS).
//!
//! Entitlements from reservation, limit and shares; placement; load balancing by migration;
//! rules; maintenance and power management. Knows nothing of KVM. Filled in by the DRS issue.
#![deny(missing_docs, missing_debug_implementations)]
