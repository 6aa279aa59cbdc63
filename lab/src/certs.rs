//! A throwaway PKI for the OpenVPN lab, made with the `openssl` CLI: a CA, a server certificate
//! (EKU serverAuth) and one client certificate per client (EKU clientAuth, CN = client name),
//! all with P-256 EC keys (so the servers run with `dh none`, ECDHE only).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::run;

/// openssl config: the extension sections used for the CA and the two kinds of leaf.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = tunmeter-lab

[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyAgreement
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyAgreement
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Certificate and key file of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The generated files.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub server: CertPair,
    /// In the order of the names given to [`Pki::generate`].
    pub clients: Vec<CertPair>,
}

/// A certificate common name the lab accepts: 1..=64 chars of `[A-Za-z0-9_.-]`.
pub fn check_cn(cn: &str) -> Result<()> {
    if cn.is_empty() || cn.len() > 64 || !cn.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        bail!("bad certificate name {cn:?}: need 1..=64 chars of [A-Za-z0-9_.-]");
    }
    Ok(())
}

fn ossl(args: &[&str]) -> Result<()> {
    run("openssl", args).map(|_| ())
}

fn private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))
}

impl Pki {
    /// Generate everything into `dir` (created if missing).
    pub fn generate(dir: &Path, server_cn: &str, client_cns: &[&str]) -> Result<Pki> {
        check_cn(server_cn)?;
        for cn in client_cns {
            check_cn(cn)?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let cnf = dir.join("openssl.cnf");
        std::fs::write(&cnf, OPENSSL_CNF)?;
        let p = |name: &str| dir.join(name);
        let s = |path: &Path| path.to_string_lossy().into_owned();
        let (cnf_s, ca_cert, ca_key) = (s(&cnf), p("ca.crt"), p("ca.key"));
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

        let mut args = vec!["req", "-config", &cnf_s, "-x509", "-extensions", "ca_ext", "-days", "3650"];
        args.extend_from_slice(&ec);
        let (ca_key_s, ca_cert_s) = (s(&ca_key), s(&ca_cert));
        args.extend_from_slice(&["-keyout", &ca_key_s, "-out", &ca_cert_s, "-subj", "/CN=tunmeter-lab-ca"]);
        ossl(&args).context("generating the CA")?;
        private(&ca_key)?;

        let leaf = |cn: &str, file: &str, ext: &str, serial: usize| -> Result<CertPair> {
            let (key, csr, cert) = (p(&format!("{file}.key")), p(&format!("{file}.csr")), p(&format!("{file}.crt")));
            let (key_s, csr_s, cert_s) = (s(&key), s(&csr), s(&cert));
            let subj = format!("/CN={cn}");
            let mut args = vec!["req", "-config", &cnf_s, "-new"];
            args.extend_from_slice(&ec);
            args.extend_from_slice(&["-keyout", &key_s, "-out", &csr_s, "-subj", &subj]);
            ossl(&args).with_context(|| format!("key and request for {cn}"))?;
            private(&key)?;
            let serial = serial.to_string();
            ossl(&[
                "x509",
                "-req",
                "-in",
                &csr_s,
                "-CA",
                &ca_cert_s,
                "-CAkey",
                &ca_key_s,
                "-set_serial",
                &serial,
                "-days",
                "3650",
                "-extfile",
                &cnf_s,
                "-extensions",
                ext,
                "-out",
                &cert_s,
            ])
            .with_context(|| format!("signing the certificate of {cn}"))?;
            let _ = std::fs::remove_file(&csr);
            Ok(CertPair { cert, key })
        };
        let server = leaf(server_cn, "server", "server_ext", 2)?;
        let clients = client_cns
            .iter()
            .enumerate()
            .map(|(i, cn)| leaf(cn, &format!("client-{}", i + 1), "client_ext", 100 + i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Pki { ca_cert, server, clients })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        for cn in ["", "a b", "a/b", "x\n", &"a".repeat(65)] {
            assert!(check_cn(cn).is_err(), "{cn:?}");
        }
        check_cn("alice.example-1_x").unwrap();
    }

    #[test]
    fn generates_a_verifiable_chain() {
        let dir = std::env::temp_dir().join(format!("tunmeter-lab-pki-test-{}", std::process::id()));
        let pki = Pki::generate(&dir, "server", &["alice", "bob"]).unwrap();
        let ca = pki.ca_cert.to_string_lossy().into_owned();
        for (pair, purpose) in [(&pki.server, "sslserver"), (&pki.clients[1], "sslclient")] {
            let c = pair.cert.to_string_lossy().into_owned();
            let out = run("openssl", &["verify", "-CAfile", &ca, "-purpose", purpose, &c]).unwrap();
            assert!(out.contains("OK"), "{out}");
        }
        let subj =
            run("openssl", &["x509", "-noout", "-subject", "-in", &pki.clients[1].cert.to_string_lossy()]).unwrap();
        assert!(subj.contains("CN = bob") || subj.contains("CN=bob"), "{subj}");
        // A client certificate is no server certificate.
        let c = pki.clients[0].cert.to_string_lossy().into_owned();
        assert!(run("openssl", &["verify", "-CAfile", &ca, "-purpose", "sslserver", &c]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
