//! The VM config blobs of a point in time.
//!
//! Every point in time of a chain has the VM's config blobs (VM config,
//! firewall rules, ...): those stored in its archive, or, when the archive
//! stores none, those of the nearest ancestor that does (incremental
//! archives written before configs were carried forward store none). The
//! capture record ([`CAPTURE_RECORD`]) is not a VM config: it describes
//! the capture that wrote its own archive (its checkpoints), so it is
//! never taken from an ancestor nor carried to a new archive.

use std::path::PathBuf;

use crate::chain::Chain;
use crate::format::{ConfigBlob, Header};
use crate::read::reader::Reader;

/// Name of the config blob in which `vma capture` records its checkpoints.
/// Never change: archives carry it.
pub const CAPTURE_RECORD: &str = "vma-capture.json";

/// Whether a config blob named `name` is one of the VM's configs (every
/// blob but the capture record).
pub fn is_vm_config(name: &str) -> bool {
    name != CAPTURE_RECORD
}

/// Where a config blob of a point in time is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// In the archive itself.
    Archive,
    /// In an ancestor (the nearest that stores VM configs).
    Ancestor {
        /// The ancestor's uuid.
        uuid: [u8; 16],
        /// The ancestor's file.
        path: PathBuf,
    },
}

/// The config blobs of one point in time, each with where it is stored.
#[derive(Clone, Debug, Default)]
pub struct PointConfigs {
    /// The blobs: the VM configs (stored or inherited), then the
    /// archive's own capture record if it has one.
    pub configs: Vec<(ConfigBlob, ConfigSource)>,
}

impl PointConfigs {
    /// The blobs alone.
    pub fn blobs(&self) -> Vec<ConfigBlob> {
        self.configs.iter().map(|(c, _)| c.clone()).collect()
    }

    /// The VM configs alone (what a new archive on top carries forward).
    pub fn vm_configs(&self) -> Vec<ConfigBlob> {
        self.configs
            .iter()
            .map(|(c, _)| c)
            .filter(|c| is_vm_config(&c.name))
            .cloned()
            .collect()
    }
}

/// Whether `header` stores VM configs of its own.
pub fn stores_vm_configs(header: &Header) -> bool {
    header.configs.iter().any(|c| is_vm_config(&c.name))
}

/// The config blobs of the point in time of the archive with `header`,
/// whose ancestors (nearest first) are `ancestors`: its own VM configs if
/// it stores any, else those of the nearest ancestor that does; then its
/// own capture record.
pub fn point_configs(header: &Header, ancestors: &[Reader]) -> PointConfigs {
    let own = |c: &ConfigBlob| (c.clone(), ConfigSource::Archive);
    if stores_vm_configs(header) || header.parent.is_none() {
        return PointConfigs {
            configs: header.configs.iter().map(own).collect(),
        };
    }
    let mut configs: Vec<(ConfigBlob, ConfigSource)> = Vec::new();
    if let Some(link) = ancestors.iter().find(|r| stores_vm_configs(r.header())) {
        let source = ConfigSource::Ancestor {
            uuid: link.header().uuid,
            path: link.path().to_path_buf(),
        };
        configs.extend(
            link.header()
                .configs
                .iter()
                .filter(|c| is_vm_config(&c.name))
                .map(|c| (c.clone(), source.clone())),
        );
    }
    configs.extend(header.configs.iter().map(own));
    PointConfigs { configs }
}

/// [`point_configs`] of an archive whose parent chain (if incremental) is
/// `parent`, as [`Chain::open_parent`] gives it.
pub fn point_configs_over(header: &Header, parent: Option<&Chain>) -> PointConfigs {
    point_configs(header, parent.map_or(&[][..], |c| c.links()))
}

impl Chain {
    /// The config blobs of the chain's newest point in time.
    pub fn point_configs(&self) -> PointConfigs {
        point_configs(self.header(), &self.links()[1..])
    }
}
