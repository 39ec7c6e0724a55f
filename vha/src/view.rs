//! A decoded snapshot of the cluster as the store describes it: members and VM records.

use std::collections::BTreeMap;

use crate::model::{HostId, HostSpec, Keys, VmId, VmRecord};
use crate::store::{ClusterStore, LeaseId, Revision, StoreError};

/// One member: its spec, the lease its key hangs on, and the key's revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Published spec.
    pub spec: HostSpec,
    /// The member's current lease.
    pub lease: LeaseId,
    /// Creation revision of the membership key.
    pub create_revision: Revision,
    /// Last modification revision of the membership key (changes at every join, so a
    /// compare on it proves the member still has the same lease).
    pub mod_revision: Revision,
}

/// A VM record with its revision (the current fencing token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    /// The record.
    pub record: VmRecord,
    /// Its `mod_revision`.
    pub token: Revision,
}

/// Decoded members and VM records, refreshed from the store. Records are decoded only when their
/// revision changed, so frequent refreshes stay cheap.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Live members (their lease-bound keys exist).
    pub members: BTreeMap<HostId, Member>,
    /// Every VM record.
    pub vms: BTreeMap<VmId, VmEntry>,
    /// Store revision of the VM read.
    pub revision: Revision,
    /// Keys whose value could not be decoded (skipped), with the reason.
    pub undecodable: Vec<(String, String)>,
}

impl ClusterView {
    /// Re-reads members and VM records.
    pub fn refresh(&mut self, store: &dyn ClusterStore, keys: &Keys) -> Result<(), StoreError> {
        let (hosts, _) = store.get_prefix(&keys.hosts())?;
        let (vms, rev) = store.get_prefix(&keys.vms())?;
        self.undecodable.clear();
        let mut members = BTreeMap::new();
        for kv in hosts {
            let Some(lease) = kv.lease else { continue };
            match self.members.values().find(|m| m.mod_revision == kv.mod_revision) {
                Some(m) if m.lease == lease => {
                    members.insert(m.spec.id, m.clone());
                }
                _ => match serde_json::from_slice::<HostSpec>(&kv.value) {
                    Ok(spec) => {
                        members.insert(
                            spec.id,
                            Member {
                                spec,
                                lease,
                                create_revision: kv.create_revision,
                                mod_revision: kv.mod_revision,
                            },
                        );
                    }
                    Err(e) => self.undecodable.push((kv.key, e.to_string())),
                },
            }
        }
        let mut out = BTreeMap::new();
        let mut old = std::mem::take(&mut self.vms);
        for kv in vms {
            let cached = old
                .iter()
                .find(|(_, e)| e.token == kv.mod_revision)
                .map(|(id, _)| *id)
                .and_then(|id| old.remove(&id));
            match cached {
                Some(e) => {
                    out.insert(e.record.spec.id, e);
                }
                None => match serde_json::from_slice::<VmRecord>(&kv.value) {
                    Ok(record) => {
                        out.insert(record.spec.id, VmEntry { record, token: kv.mod_revision });
                    }
                    Err(e) => self.undecodable.push((kv.key, e.to_string())),
                },
            }
        }
        self.members = members;
        self.vms = out;
        self.revision = rev;
        Ok(())
    }

    /// Reads a fresh view.
    pub fn read(store: &dyn ClusterStore, keys: &Keys) -> Result<Self, StoreError> {
        let mut v = Self::default();
        v.refresh(store, keys)?;
        Ok(v)
    }

    /// Whether the VM's assignment is still backed by its owner's live lease.
    pub fn owner_alive(&self, e: &VmEntry) -> bool {
        match (e.record.owner, e.record.owner_lease) {
            (Some(h), Some(l)) => self.members.get(&h).is_some_and(|m| m.lease == l),
            _ => false,
        }
    }
}
