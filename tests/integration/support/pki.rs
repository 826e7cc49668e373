//! A test certificate authority (made with rcgen) and the certificates it signs, as PEM text or
//! files.

use std::path::{Path, PathBuf};

/// A CA and the certificates it signs, as PEM files in `dir`.
pub struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
    name: String,
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), ca.pem()).unwrap();
        Pki {
            ca,
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn ca_file(&self) -> String {
        self.dir
            .join(format!("{}.crt", self.name))
            .display()
            .to_string()
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// (certificate PEM, key PEM) for `names` (DNS names or IP addresses).
    pub fn issue_pem(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// (certificate file, key file) for `names`, written as `file`.crt and `file`.key.
    pub fn issue(&self, file: &str, names: &[&str]) -> (String, String) {
        let (cert, key) = self.issue_pem(names);
        let (cert_file, key_file) = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        (
            cert_file.display().to_string(),
            key_file.display().to_string(),
        )
    }
}
