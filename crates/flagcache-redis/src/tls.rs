//! TLS for `rediss://`: the rustls crypto provider, a root certificate to trust instead
//! of the system's, and telling a refused certificate from other errors.

/// redis-rs uses rustls without choosing a crypto provider: installs ring's, once.
pub(crate) fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another provider installed by the application is fine too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The certificates that make a client trust the PEM root certificate `pem`.
pub(crate) fn trusting(pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    }
}

/// Whether a TLS handshake refused the peer (a certificate problem) somewhere in the
/// error's chain.
pub(crate) fn refused(e: &redis::RedisError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some()
            || err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
        {
            return true;
        }
        cur = err.source();
    }
    e.to_string().contains("certificate")
}
