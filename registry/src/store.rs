//! The local content-addressed store: blobs by `sha256` digest, written only once verified, so
//! installed plugins load offline and a tampered file is caught on read.

use crate::RegistryError;
use futures::{Stream, StreamExt};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Blobs under `<root>/sha256/<hex>`. Writes go to `<root>/tmp` first and are renamed into place
/// only after their digest and size check out, so the store never holds a partial or wrong blob.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// Splits `sha256:<hex>` into its hex part, refusing any other algorithm or shape.
pub fn sha256_hex(digest: &str) -> Result<&str, RegistryError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {
            Ok(hex)
        }
        _ => Err(RegistryError::Invalid(format!("`{digest}` is not a sha256 digest (sha256:<64 lowercase hex>)"))),
    }
}

/// `sha256:<hex>` of `bytes`. Uses ring's SHA-256 (assembly, 2-3x the pure-Rust `sha2` on
/// CPUs without SHA extensions): every load re-hashes the plugin it reads from the store.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes)))
}

impl BlobStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        BlobStore { root: root.into() }
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives.
    pub fn path(&self, digest: &str) -> Result<PathBuf, RegistryError> {
        Ok(self.root.join("sha256").join(sha256_hex(digest)?))
    }

    /// Whether the store holds `digest`.
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Reads a blob and checks it still has its digest (a file changed on disk is refused).
    pub fn read(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let path = self.path(digest)?;
        let bytes = std::fs::read(&path).map_err(|e| {
            RegistryError::Store(format!("blob {digest} is not in the local store ({}): {e}", path.display()))
        })?;
        let actual = digest_of(&bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("the local copy of blob {digest} ({})", path.display()),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores `bytes` under their digest; returns the digest.
    pub fn put(&self, bytes: &[u8]) -> Result<String, RegistryError> {
        let digest = digest_of(bytes);
        let path = self.path(&digest)?;
        if path.is_file() {
            return Ok(digest);
        }
        let tmp = self.temp_path()?;
        std::fs::write(&tmp, bytes).map_err(|e| RegistryError::Store(format!("writing {}: {e}", tmp.display())))?;
        self.publish(&tmp, &path)?;
        Ok(digest)
    }

    /// Streams a blob into the store, hashing as it goes. More than `expected_size` bytes stops
    /// the download at once; a short stream or another digest is refused. Either way nothing is
    /// kept.
    pub async fn put_stream<S>(
        &self,
        expected_digest: &str,
        expected_size: u64,
        mut stream: S,
    ) -> Result<(), RegistryError>
    where
        S: Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin,
    {
        let path = self.path(expected_digest)?;
        let tmp = self.temp_path()?;
        let result = async {
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| RegistryError::Store(format!("creating {}: {e}", tmp.display())))?;
            let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    // oci-client verifies full downloads too and reports a mismatch as the
                    // stream's last item ("Invalid digest. Expected …, got …").
                    let message = e.to_string();
                    match message.strip_prefix("Invalid digest. Expected ").and_then(|m| m.split_once(", got ")) {
                        Some((_, actual)) => RegistryError::DigestMismatch {
                            what: "the downloaded blob".into(),
                            expected: expected_digest.to_string(),
                            actual: actual.to_string(),
                        },
                        None => RegistryError::Transport(format!("downloading {expected_digest}: {message}")),
                    }
                })?;
                size += chunk.len() as u64;
                if size > expected_size {
                    return Err(RegistryError::SizeMismatch {
                        digest: expected_digest.to_string(),
                        expected: expected_size,
                        actual: format!("more than {expected_size}"),
                    });
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|e| RegistryError::Store(format!("writing {}: {e}", tmp.display())))?;
            }
            if size != expected_size {
                return Err(RegistryError::SizeMismatch {
                    digest: expected_digest.to_string(),
                    expected: expected_size,
                    actual: size.to_string(),
                });
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finish()));
            if actual != expected_digest {
                return Err(RegistryError::DigestMismatch {
                    what: "the downloaded blob".into(),
                    expected: expected_digest.to_string(),
                    actual,
                });
            }
            file.sync_all().await.map_err(|e| RegistryError::Store(format!("syncing {}: {e}", tmp.display())))?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => self.publish(&tmp, &path),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Deletes a blob (when no install uses it any more).
    pub fn remove(&self, digest: &str) -> Result<(), RegistryError> {
        let path = self.path(digest)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RegistryError::Store(format!("removing {}: {e}", path.display()))),
        }
    }

    /// Every digest in the store.
    pub fn digests(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join("sha256")) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .map(|h| format!("sha256:{h}"))
            .collect()
    }

    fn temp_path(&self) -> Result<PathBuf, RegistryError> {
        let dir = self.root.join("tmp");
        std::fs::create_dir_all(&dir).map_err(|e| RegistryError::Store(format!("creating {}: {e}", dir.display())))?;
        let unique = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        );
        Ok(dir.join(unique))
    }

    fn publish(&self, tmp: &Path, path: &Path) -> Result<(), RegistryError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| RegistryError::Store(format!("creating {}: {e}", parent.display())))?;
        }
        std::fs::rename(tmp, path).map_err(|e| RegistryError::Store(format!("storing {}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stream(parts: &[&'static [u8]]) -> impl Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin {
        futures::stream::iter(parts.iter().map(|p| Ok(bytes::Bytes::from_static(p))).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn only_verified_blobs_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let digest = digest_of(b"hello world");
        store.put_stream(&digest, 11, stream(&[b"hello ", b"world"])).await.unwrap();
        assert_eq!(store.read(&digest).unwrap(), b"hello world");

        let other = digest_of(b"hello there");
        let err = store.put_stream(&other, 11, stream(&[b"hello world"])).await.unwrap_err();
        assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
        let err = store.put_stream(&other, 5, stream(&[b"hello world"])).await.unwrap_err();
        assert!(matches!(err, RegistryError::SizeMismatch { .. }), "{err}");
        assert!(!store.contains(&other));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no partial files remain");

        std::fs::write(store.path(&digest).unwrap(), b"HELLO world").unwrap();
        assert!(matches!(store.read(&digest), Err(RegistryError::DigestMismatch { .. })));
    }

    #[test]
    fn digests_are_checked_for_shape() {
        assert!(sha256_hex("sha256:../../etc/passwd").is_err());
        assert!(sha256_hex("md5:abc").is_err());
        assert!(sha256_hex(&digest_of(b"")).is_ok());
    }
}
