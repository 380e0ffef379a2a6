//! Node identity: an existing OpenSSH ed25519 key.
//!
//! Owns loading the key (refusing anything but ed25519, with an error that says how to make
//! one), deriving the X25519 Noise static key from it, and presenting the public identity the way
//! OpenSSH does. Invariants: the private key never leaves this module except as the derived
//! X25519 secret handed to the handshake; the derived public key is computable from the SSH
//! public key alone ([`PublicIdentity::from_ssh_line`]), so an SSH public key line *is* a peer's
//! mesh identity.

use std::{fmt, fs, io::IsTerminal, os::unix::fs::PermissionsExt, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use curve25519_dalek::edwards::CompressedEdwardsY;
use sha2::{Digest, Sha512};
use ssh_key::{Algorithm, HashAlg, PrivateKey, PublicKey, private::KeypairData};
use zeroize::Zeroizing;

/// Default identity of the system daemon.
pub const DEFAULT_IDENTITY: &str = "/etc/ssh/ssh_host_ed25519_key";

/// Why an identity could not be loaded. Every variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity key {path}: {source}; pass --identity PATH to use another OpenSSH ed25519 key")]
    Unreadable { path: String, source: std::io::Error },
    #[error("identity key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
    #[error(
        "{path} is not an OpenSSH private key ({reason}); TunnelMesh needs an ed25519 key: run `ssh-keygen -t ed25519 -f <new path>` and pass it with --identity"
    )]
    NotOpenSsh { path: String, reason: String },
    #[error(
        "identity key {path} is {algorithm}; TunnelMesh needs an ed25519 key: run `ssh-keygen -t ed25519 -f <new path>` and pass it with --identity"
    )]
    NotEd25519 { path: String, algorithm: String },
    #[error(
        "identity key {path} is encrypted and there is no terminal to ask for its passphrase; run interactively, or use an unencrypted key (`ssh-keygen -p -N '' -f {path}` removes the passphrase)"
    )]
    EncryptedNoTerminal { path: String },
    #[error("wrong passphrase for identity key {path}")]
    WrongPassphrase { path: String },
    #[error("{0:?} is not an OpenSSH ed25519 public key line ({1}); expected `ssh-ed25519 AAAA… [comment]`")]
    BadPublicLine(String, String),
}

/// Why a well-formed OpenSSH key is still not one TunnelMesh can use (the reason inside an
/// [`IdentityError`]).
#[derive(Debug, thiserror::Error)]
enum KeyProblem {
    #[error("the key is {0}, not ed25519")]
    NotEd25519(String),
    #[error("the ed25519 key is not a valid curve point")]
    NotOnCurve,
    #[error("not an ed25519 key pair")]
    NotEd25519Pair,
}

/// How OpenSSH users name a key type ("RSA", "ECDSA", …).
fn algorithm_name(algorithm: &Algorithm) -> String {
    match algorithm {
        Algorithm::Rsa { .. } => "RSA".into(),
        Algorithm::Ecdsa { .. } => "ECDSA".into(),
        Algorithm::Dsa => "DSA".into(),
        Algorithm::SkEd25519 => "a FIDO security-key ed25519 key (ed25519-sk)".into(),
        Algorithm::SkEcdsaSha2NistP256 => "a FIDO security-key ECDSA key (ecdsa-sk)".into(),
        other => other.to_string(),
    }
}

/// The public half of a node identity: its SSH public key and the derived Noise key. Two
/// identities are equal when their keys are (comments do not matter).
#[derive(Clone)]
pub struct PublicIdentity {
    ssh: PublicKey,
    noise: [u8; 32],
}

/// Verify an SSHSIG `signature` (armored) over `msg` for `namespace` by `key`.
pub fn verify_signature(key: &PublicIdentity, namespace: &str, msg: &[u8], signature: &str) -> bool {
    ssh_key::SshSig::from_pem(signature).is_ok_and(|sig| key.ssh.verify(namespace, msg, &sig).is_ok())
}

impl PublicIdentity {
    /// Parse an OpenSSH public key line (`ssh-ed25519 AAAA… comment`).
    pub fn from_ssh_line(line: &str) -> Result<Self, IdentityError> {
        let bad = |why: String| IdentityError::BadPublicLine(line.to_string(), why);
        let ssh = PublicKey::from_openssh(line.trim()).map_err(|e| bad(e.to_string()))?;
        Self::from_ssh(ssh).map_err(|e| bad(e.to_string()))
    }

    fn from_ssh(ssh: PublicKey) -> Result<Self, KeyProblem> {
        let ed = ssh
            .key_data()
            .ed25519()
            .ok_or_else(|| KeyProblem::NotEd25519(ssh.algorithm().to_string()))?;
        let point = CompressedEdwardsY(ed.0).decompress().ok_or(KeyProblem::NotOnCurve)?;
        Ok(PublicIdentity {
            noise: point.to_montgomery().to_bytes(),
            ssh,
        })
    }

    /// The X25519 static public key used in the Noise handshake.
    pub fn noise_public(&self) -> &[u8; 32] {
        &self.noise
    }

    /// The Noise public key in WireGuard's base64 form (`PublicKey =` in a wg config).
    pub fn noise_public_base64(&self) -> String {
        BASE64.encode(self.noise)
    }

    /// `SHA256:…`, as OpenSSH prints it.
    pub fn fingerprint(&self) -> String {
        self.ssh.fingerprint(HashAlg::Sha256).to_string()
    }

    /// The `ssh-ed25519 AAAA…` line without comment.
    pub fn ssh_line(&self) -> String {
        let mut key = self.ssh.clone();
        key.set_comment("");
        key.to_openssh().expect("ed25519 keys encode")
    }

    /// The full OpenSSH public key line, comment included.
    pub fn ssh_line_with_comment(&self) -> String {
        self.ssh.to_openssh().expect("ed25519 keys encode")
    }

    /// The key's comment, if any.
    pub fn comment(&self) -> &str {
        self.ssh.comment()
    }

    /// The line `ssh-keygen -lf` prints for this key.
    pub fn ssh_keygen_line(&self) -> String {
        let comment = if self.comment().is_empty() {
            "no comment"
        } else {
            self.comment()
        };
        format!("256 {} {} (ED25519)", self.fingerprint(), comment)
    }
}

impl PartialEq for PublicIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.noise == other.noise
    }
}

impl Eq for PublicIdentity {}

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicIdentity({})", self.fingerprint())
    }
}

/// A node's own identity: the SSH key, its public part, and the derived X25519 secret.
pub struct Identity {
    key: PrivateKey,
    public: PublicIdentity,
    noise_secret: Zeroizing<[u8; 32]>,
}

impl Identity {
    /// Load an OpenSSH ed25519 private key, asking for its passphrase on the terminal if it is
    /// encrypted and a terminal is attached.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let shown = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|source| IdentityError::Unreadable {
            path: shown.clone(),
            source,
        })?;
        let mode = fs::metadata(path)
            .map_err(|source| IdentityError::Unreadable {
                path: shown.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: shown,
                mode: mode & 0o777,
            });
        }
        let key = PrivateKey::from_openssh(&text).map_err(|e| IdentityError::NotOpenSsh {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(IdentityError::NotEd25519 {
                path: shown,
                algorithm: algorithm_name(&key.algorithm()),
            });
        }
        let key = if key.is_encrypted() {
            if !std::io::stdin().is_terminal() {
                return Err(IdentityError::EncryptedNoTerminal { path: shown });
            }
            let pass = Zeroizing::new(rpassword::prompt_password(format!("Passphrase for {shown}: ")).map_err(
                |source| IdentityError::Unreadable {
                    path: shown.clone(),
                    source,
                },
            )?);
            key.decrypt(pass.as_bytes())
                .map_err(|_| IdentityError::WrongPassphrase { path: shown.clone() })?
        } else {
            key
        };
        Self::from_private(&key).map_err(|e| IdentityError::NotOpenSsh {
            path: shown,
            reason: e.to_string(),
        })
    }

    fn from_private(key: &PrivateKey) -> Result<Self, KeyProblem> {
        let KeypairData::Ed25519(pair) = key.key_data() else {
            return Err(KeyProblem::NotEd25519Pair);
        };
        let public = PublicIdentity::from_ssh(key.public_key().clone())?;
        // X25519 secret = clamped first half of SHA-512(seed), the same scalar ed25519 signs with.
        let digest: Zeroizing<[u8; 64]> = Zeroizing::new(Sha512::digest(pair.private.as_ref()).into());
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&digest[..32]);
        secret[0] &= 248;
        secret[31] &= 127;
        secret[31] |= 64;
        Ok(Identity {
            key: key.clone(),
            public,
            noise_secret: secret,
        })
    }

    /// The public identity.
    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }

    /// Sign `msg` for `namespace` (SSHSIG, as `ssh-keygen -Y sign` does); the armored signature.
    pub fn sign(&self, namespace: &str, msg: &[u8]) -> String {
        self.key
            .sign(namespace, HashAlg::Sha512, msg)
            .and_then(|sig| sig.to_pem(ssh_key::LineEnding::LF))
            .expect("an ed25519 key always signs")
    }

    /// A fresh random identity (the coordinator's own key on first start).
    pub fn generate(comment: &str) -> (Self, String) {
        let mut key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).expect("ed25519 keys generate");
        key.set_comment(comment);
        let pem = key.to_openssh(ssh_key::LineEnding::LF).expect("encodes").to_string();
        (Self::from_private(&key).expect("ed25519"), pem)
    }

    /// The identity whose ed25519 seed is `seed`: the same key on every run, for the tests' and
    /// fuzz targets' machines (a failure must reproduce byte for byte).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_seed(seed: [u8; 32], comment: &str) -> Self {
        let mut key = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
        key.set_comment(comment);
        Self::from_private(&key).expect("ed25519")
    }

    /// The (decrypted) key in OpenSSH format, for the SSH transport's host and client key.
    pub fn openssh_private(&self) -> Zeroizing<String> {
        self.key
            .to_openssh(ssh_key::LineEnding::LF)
            .expect("an ed25519 key encodes")
    }

    /// The X25519 static secret for the Noise handshake.
    pub fn noise_secret(&self) -> &[u8; 32] {
        &self.noise_secret
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::MontgomeryPoint;

    fn keygen(dir: &Path, name: &str, args: &[&str]) -> std::path::PathBuf {
        let path = dir.join(name);
        let status = std::process::Command::new("ssh-keygen")
            .args(args)
            .args(["-q", "-C", "node@test", "-f"])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .status()
            .expect("ssh-keygen must be installed (openssh-client)");
        assert!(status.success());
        path
    }

    #[test]
    fn derived_public_key_matches_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = keygen(dir.path(), "id", &["-t", "ed25519", "-N", ""]);
        let id = Identity::load(&path).unwrap();
        // X25519 of the derived secret equals the Edwards→Montgomery image of the SSH public key.
        let from_secret = MontgomeryPoint::mul_base_clamped(*id.noise_secret());
        assert_eq!(from_secret.to_bytes(), *id.public().noise_public());
        let line = fs::read_to_string(path.with_extension("pub")).unwrap();
        assert_eq!(PublicIdentity::from_ssh_line(&line).unwrap(), *id.public());
    }

    #[test]
    fn fingerprint_line_is_exactly_what_ssh_keygen_prints() {
        let dir = tempfile::tempdir().unwrap();
        let path = keygen(dir.path(), "id", &["-t", "ed25519", "-N", ""]);
        let out = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(&path)
            .output()
            .unwrap();
        let expected = String::from_utf8(out.stdout).unwrap();
        let id = Identity::load(&path).unwrap();
        assert_eq!(id.public().ssh_keygen_line(), expected.trim_end());
    }

    #[test]
    fn rsa_and_ecdsa_keys_are_refused_with_the_command_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        for (name, args) in [
            ("rsa", ["-t", "rsa", "-b", "2048"]),
            ("ecdsa", ["-t", "ecdsa", "-b", "256"]),
        ] {
            let path = keygen(dir.path(), name, &[args[0], args[1], args[2], args[3], "-N", ""]);
            let err = Identity::load(&path).err().unwrap();
            assert!(matches!(err, IdentityError::NotEd25519 { .. }), "{err}");
            assert!(err.to_string().contains("ssh-keygen -t ed25519"), "{err}");
        }
    }

    #[test]
    fn encrypted_key_without_terminal_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = keygen(dir.path(), "enc", &["-t", "ed25519", "-N", "secret pass"]);
        // Under `cargo test` stdin is not a terminal.
        let err = Identity::load(&path).err().unwrap();
        assert!(matches!(err, IdentityError::EncryptedNoTerminal { .. }), "{err}");
    }

    #[test]
    fn missing_file_and_loose_permissions_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Identity::load(&dir.path().join("absent")).err().unwrap();
        assert!(err.to_string().contains("--identity"), "{err}");
        let path = keygen(dir.path(), "loose", &["-t", "ed25519", "-N", ""]);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::write(dir.path().join("junk"), "hello").unwrap();
        fs::set_permissions(dir.path().join("junk"), fs::Permissions::from_mode(0o600)).unwrap();
        let err = Identity::load(&dir.path().join("junk")).err().unwrap();
        assert!(matches!(err, IdentityError::NotOpenSsh { .. }), "{err}");
    }
}
