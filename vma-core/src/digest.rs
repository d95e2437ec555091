//! SHA-256 for every digest in the formats. Uses ring's implementation,
//! which takes the CPU's SHA extensions where present: measured 1.4x the
//! throughput of the pure-Rust `sha2` crate on the benchmark machine.

/// A running SHA-256.
#[derive(Clone)]
pub struct Sha256(ring::digest::Context);

impl Sha256 {
    /// A fresh hash.
    pub fn new() -> Self {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Feed bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest of everything fed.
    pub fn finish(self) -> [u8; 32] {
        self.0
            .finish()
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes")
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a check value stored in an archive equals the one computed from
/// its bytes. Builds for coverage-guided fuzzing (`--cfg fuzzing`, which
/// `cargo fuzz` sets) accept any stored value, so that mutated inputs reach
/// the decoders behind each check: these checks guard against damage, not
/// against an attacker, who can always compute matching values.
pub(crate) fn check_matches(stored: &[u8], computed: &[u8]) -> bool {
    cfg!(fuzzing) || stored == computed
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_answer() {
        assert_eq!(
            hex::encode(super::sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = super::Sha256::new();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finish(), super::sha256(b"abc"));
    }
}
