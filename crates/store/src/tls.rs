//! TLS to PostgreSQL for the read side (tokio-postgres, deadpool), following `sslmode` and
//! `sslrootcert` in `DATABASE_URL` as libpq does. The write side's sqlx reads the same two
//! parameters itself (with its own rustls), so one URL means the same on both pools.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | |
//! | `prefer` (default) | if the server offers it | not checked |
//! | `require` | always | not checked; with `sslrootcert`, checked as `verify-ca` |
//! | `verify-ca` | always | signed by `sslrootcert` (else the Mozilla roots) |
//! | `verify-full` | always | as `verify-ca`, and issued for the host name |
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require` and no `sslrootcert`,
//! so both are taken out of the URL before it parses the rest.

use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// What tokio-postgres needs to connect: its configuration and the TLS connector.
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub ssl_mode: SslMode,
}

/// Reads `url` (a `postgres://` URL) with its TLS parameters.
pub fn pg_target(url: &str) -> anyhow::Result<PgTarget> {
    const INVALID: &str = "DATABASE_URL is not a valid PostgreSQL URL";
    let mut parsed = url::Url::parse(url).context(INVALID)?;
    let mut ssl_mode = SslMode::Prefer;
    let mut root_cert: Option<String> = None;
    let mut kept = Vec::new();
    for (key, value) in parsed.query_pairs() {
        match key.as_ref() {
            "sslmode" => {
                ssl_mode = match value.as_ref() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => anyhow::bail!(
                        "DATABASE_URL: sslmode must be disable, prefer, require, verify-ca or verify-full, got {other:?}"
                    ),
                }
            }
            "sslrootcert" => root_cert = Some(value.into_owned()),
            "sslcert" | "sslkey" => {
                anyhow::bail!("DATABASE_URL: client certificates ({key}) are not supported")
            }
            _ => kept.push((key.into_owned(), value.into_owned())),
        }
    }
    parsed.set_query(None);
    if !kept.is_empty() {
        parsed.query_pairs_mut().extend_pairs(kept);
    }
    let mut config: tokio_postgres::Config = parsed.as_str().parse().context(INVALID)?;
    config.ssl_mode(match ssl_mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    let tls = MakeRustlsConnect::new(client_config(ssl_mode, root_cert.as_deref())?);
    Ok(PgTarget {
        config,
        tls,
        ssl_mode,
    })
}

fn client_config(mode: SslMode, root_cert: Option<&str>) -> anyhow::Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    // libpq: `require` with a root certificate checks the chain, like `verify-ca`.
    let check = match (mode, root_cert) {
        (SslMode::VerifyFull, _) => Check::Full,
        (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Check::Chain,
        _ => Check::Nothing,
    };
    if check == Check::Nothing {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth());
    }
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("DATABASE_URL: reading sslrootcert {path}"))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("DATABASE_URL: sslrootcert {path} is not PEM"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            anyhow::ensure!(
                added > 0,
                "DATABASE_URL: sslrootcert {path} holds no usable certificate"
            );
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .context("TLS certificate verifier")?;
    Ok(match check {
        Check::Full => builder.with_webpki_verifier(webpki).with_no_client_auth(),
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            .with_no_client_auth(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    Full,
}

/// `prefer` and `require`: encrypted, the certificate unchecked (libpq's meaning). The
/// handshake signatures are still verified, so the session is with the certificate's key.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let t = pg_target(
            "postgres://u:p@db.example.com:6543/postgres?sslmode=verify-full&application_name=x",
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(t.ssl_mode, SslMode::VerifyFull);
        assert_eq!(t.config.get_dbname(), Some("postgres"));
        assert_eq!(t.config.get_application_name(), Some("x"));
        let t = pg_target("postgres://u@localhost/db").unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(t.ssl_mode, SslMode::Prefer);
        assert!(pg_target("postgres://u@localhost/db?sslmode=sometimes").is_err());
        assert!(
            pg_target("postgres://u@localhost/db?sslmode=verify-ca&sslrootcert=/nonexistent")
                .is_err()
        );
        assert!(pg_target("postgres://u@localhost/db?sslcert=/x").is_err());
    }
}
