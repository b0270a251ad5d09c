//! Request ids derived from what herald already knows, so a request is the
//! same bytes every time it is built for the same inputs (golden files,
//! duplicate detection) without herald storing one more id.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// 16 bytes from SHA-256 of `parts`, with the UUID version-4 and variant
/// bits set: random-looking and well-formed, but reproducible.
pub fn uuid_bytes(parts: &[&str]) -> [u8; 16] {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// The canonical `8-4-4-4-12` form.
pub fn uuid(parts: &[&str]) -> String {
    let b = uuid_bytes(parts);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// base64url without padding of the UUID bytes: 22 characters.
pub fn uuid_base64url(parts: &[&str]) -> String {
    URL_SAFE_NO_PAD.encode(uuid_bytes(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_well_formed_and_short() {
        let a = uuid(&["d-1", "1"]);
        assert_eq!(a, uuid(&["d-1", "1"]));
        assert_ne!(a, uuid(&["d-1", "2"]));
        assert_ne!(uuid(&["d-1", "12"]), uuid(&["d-11", "2"]));
        assert_eq!(&a[14..15], "4");
        assert_eq!(uuid_base64url(&["x"]).len(), 22);
    }
}
