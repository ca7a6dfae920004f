//! A node's identity and the TLS configurations built from it.
//!
//! Each node has a key pair (ECDSA P-256, made by `syncd init`) and a
//! self-signed certificate for it. Its **node id** is the first 16 bytes of
//! the BLAKE3 hash of its SubjectPublicKeyInfo: peers pin each other by id,
//! no CA is involved. Both sides present certificates (mutual TLS, TLS 1.3
//! only, 0-RTT off); a certificate whose key hashes to an id that is not
//! configured is refused in the handshake, before any request.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use geosync_proto::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// ALPN of the geosync protocol.
pub const ALPN: &[u8] = b"geosync/1";

/// Errors handling identities.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Key or certificate file trouble.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// No key yet.
    #[error("no node key in {0}: run `syncd init --store STORE` first")]
    NoKey(String),
    /// A key exists already.
    #[error("{0} already has a node key (node id {1}); refusing to replace it")]
    Exists(String, NodeId),
    /// Bad PEM, bad certificate.
    #[error("{0}")]
    Invalid(String),
    /// TLS configuration.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// `STORE/syncd`: the node's key, certificate and control socket.
pub fn state_dir(store: &Path) -> PathBuf {
    store.join("syncd")
}

/// The node id of a certificate: BLAKE3 of its SubjectPublicKeyInfo.
pub fn node_id_of(cert: &[u8]) -> Result<NodeId, String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("bad certificate: {e}"))?;
    Ok(node_id_of_spki(c.tbs_certificate.subject_pki.raw))
}

fn node_id_of_spki(spki: &[u8]) -> NodeId {
    let h = blake3::hash(spki);
    NodeId(h.as_bytes()[..16].try_into().unwrap())
}

/// A node's key pair and certificate.
#[derive(Debug)]
pub struct Identity {
    /// Node id.
    pub id: NodeId,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            id: self.id,
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Make a new key pair and certificate in `STORE/syncd` (mode 0700,
    /// key 0600). Refuses to overwrite an existing key.
    pub fn create(store: &Path) -> Result<Identity, IdentityError> {
        let dir = state_dir(store);
        match Identity::load(store) {
            Ok(id) => return Err(IdentityError::Exists(dir.display().to_string(), id.id)),
            Err(IdentityError::NoKey(_)) if !dir.join("key.pem").exists() => {}
            Err(e) => {
                // A key without a loadable certificate (written by a build
                // before the pair was renamed into place, or damaged): never
                // replaced silently.
                return Err(IdentityError::Invalid(format!(
                    "{} holds a key but the node identity does not load ({e}): remove {} and run `syncd init` again",
                    dir.display(),
                    dir.display()
                )));
            }
        }
        let io = |what, path: &Path| {
            let path = path.display().to_string();
            move |source| IdentityError::Io { what, path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        set_mode(&dir, 0o700).map_err(io("securing", &dir))?;
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec!["geosync".to_string()])
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "geosync node");
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let id = node_id_of(cert.der()).map_err(IdentityError::Invalid)?;
        // Both written aside and synced, then renamed into place, the key
        // last: a crash leaves no key without its certificate (a
        // certificate alone is replaced by the next init).
        let (kp, cp) = (dir.join("key.pem"), dir.join("cert.pem"));
        let (kt, ct) = (dir.join("key.pem.tmp"), dir.join("cert.pem.tmp"));
        for t in [&kt, &ct] {
            let _ = std::fs::remove_file(t);
        }
        write_private(&kt, key.serialize_pem().as_bytes()).map_err(io("writing", &kt))?;
        write_private(&ct, cert.pem().as_bytes()).map_err(io("writing", &ct))?;
        std::fs::rename(&ct, &cp).map_err(io("renaming into place", &cp))?;
        std::fs::rename(&kt, &kp).map_err(io("renaming into place", &kp))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &dir))?;
        let me = Identity::load(store)?;
        assert_eq!(me.id, id, "the certificate names another key");
        Ok(me)
    }

    /// Load the key and certificate from `STORE/syncd`.
    pub fn load(store: &Path) -> Result<Identity, IdentityError> {
        let dir = state_dir(store);
        let kp = dir.join("key.pem");
        let cp = dir.join("cert.pem");
        if !kp.exists() || !cp.exists() {
            return Err(IdentityError::NoKey(dir.display().to_string()));
        }
        let key = PrivateKeyDer::from_pem_file(&kp)
            .map_err(|e| IdentityError::Invalid(format!("{}: {e}", kp.display())))?;
        let cert = CertificateDer::from_pem_file(&cp)
            .map_err(|e| IdentityError::Invalid(format!("{}: {e}", cp.display())))?;
        let id = node_id_of(&cert).map_err(|e| IdentityError::Invalid(format!("{}: {e}", cp.display())))?;
        Ok(Identity { id, cert, key })
    }

    /// TLS for dialing `peer`: its certificate must hash to `peer`.
    pub fn client_config(&self, peer: NodeId) -> Result<rustls::ClientConfig, IdentityError> {
        let provider = provider();
        let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer { peer, provider }))
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        c.enable_early_data = false;
        Ok(c)
    }

    /// TLS for accepting peers: a client certificate is required and must
    /// hash to one of `peers`.
    pub fn server_config(&self, peers: Vec<NodeId>) -> Result<rustls::ServerConfig, IdentityError> {
        let provider = provider();
        let mut s = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(PinnedClients { peers, provider }))
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())?;
        s.alpn_protocols = vec![ALPN.to_vec()];
        s.max_early_data_size = 0;
        Ok(s)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

fn write_private(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn refuse(msg: String) -> rustls::Error {
    tracing::warn!("TLS handshake refused: {msg}");
    rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
}

#[derive(Debug)]
struct PinnedServer {
    peer: NodeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = node_id_of(end_entity).map_err(refuse)?;
        if id != self.peer {
            return Err(refuse(format!(
                "peer presented node id {id}, expected {} (pinned in the config)",
                self.peer
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug)]
struct PinnedClients {
    peers: Vec<NodeId>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PinnedClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = node_id_of(end_entity).map_err(refuse)?;
        if !self.peers.contains(&id) {
            return Err(refuse(format!("unknown peer {id}: not in this node's config")));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_load_and_ids_match_the_key() {
        let t = tempfile::tempdir().unwrap();
        let a = Identity::create(t.path()).unwrap();
        let b = Identity::load(t.path()).unwrap();
        assert_eq!(a.id, b.id);
        assert!(matches!(
            Identity::create(t.path()),
            Err(IdentityError::Exists(..))
        ));
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(state_dir(t.path()).join("key.pem")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Identity::create(other.path()).unwrap().id, a.id);
        // A key whose certificate is gone is refused with what to do, and kept.
        let d = state_dir(other.path());
        std::fs::remove_file(d.join("cert.pem")).unwrap();
        let key = std::fs::read(d.join("key.pem")).unwrap();
        let e = Identity::create(other.path()).unwrap_err().to_string();
        assert!(e.contains("holds a key") && e.contains("remove"), "{e}");
        assert_eq!(std::fs::read(d.join("key.pem")).unwrap(), key);
        // A certificate alone (a crash between the renames) is replaced.
        std::fs::remove_file(d.join("key.pem")).unwrap();
        std::fs::write(d.join("cert.pem"), b"stale").unwrap();
        Identity::create(other.path()).unwrap();
        Identity::load(other.path()).unwrap();
        assert!(matches!(
            Identity::load(&t.path().join("x")),
            Err(IdentityError::NoKey(_))
        ));
    }
}
