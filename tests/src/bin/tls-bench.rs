//! `tls-bench`: compares the two rustls crypto providers, `ring` and `aws-lc-rs`, on the TLS the
//! mesh speaks: TLS 1.3 with mutual auth, ECDSA P-256 chains (root -> intermediate -> leaf with a
//! SPIFFE URI SAN, each side presenting leaf + intermediate), ALPN "h2". Everything runs in memory
//! (no sockets) on one thread, so every number is rustls + crypto cost of BOTH ends on one core.
//!
//! Per provider it measures full handshakes per second (resumption and tickets disabled) and
//! client->server bulk throughput (64 MiB in 16 KiB writes, encrypt + decrypt) for the default
//! suite and with the suite forced to AES-128-GCM and to ChaCha20-Poly1305. Each number is the
//! median of 5 rounds after one discarded warm-up round; rounds alternate which provider goes
//! first so drift on a noisy machine hits both alike. Any TLS failure exits nonzero.
//!
//! Run with `cargo xtask bench tls` (a release build: debug-build numbers mean nothing).

use std::error::Error;
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs, ring};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{CipherSuite, ClientConfig, ClientConnection, Connection, HandshakeKind};
use rustls::{RootCertStore, ServerConfig, ServerConnection};

type Res<T> = Result<T, Box<dyn Error>>;
type MakeProvider = fn() -> CryptoProvider;

const PROVIDERS: [(&str, MakeProvider); 2] = [
    ("ring", ring::default_provider),
    ("aws-lc-rs", aws_lc_rs::default_provider),
];
const ROUNDS: usize = 5;
const HANDSHAKES_PER_ROUND: usize = 200;
const BULK_BYTES: usize = 64 << 20;
const WRITE_SIZE: usize = 16 << 10;
const ROUND_TIME_LIMIT: Duration = Duration::from_secs(10);
/// `None` is the provider's default suite list; the others force exactly one suite.
const SUITES: [Option<CipherSuite>; 3] = [
    None,
    Some(CipherSuite::TLS13_AES_128_GCM_SHA256),
    Some(CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
];
const COLUMNS: [&str; 4] = [
    "handshakes/s",
    "default MB/s",
    "AES128GCM MB/s",
    "CHACHA MB/s",
];

/// A leaf chain (leaf, intermediate) and its PKCS#8 key.
struct Identity(Vec<CertificateDer<'static>>, Vec<u8>);

struct Pki {
    root: CertificateDer<'static>,
    server: Identity,
    client: Identity,
}

struct Configs {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

fn pki() -> Res<Pki> {
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca = |cn: &str| -> Res<(CertificateParams, KeyPair)> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok((p, KeyPair::generate_for(alg)?))
    };
    let (params, key) = ca("nodemesh bench root")?;
    let root = CertifiedIssuer::self_signed(params, key)?;
    let (params, key) = ca("nodemesh bench intermediate")?;
    let inter = CertifiedIssuer::signed_by(params, key, &root)?;
    // The server leaf also gets a DNS SAN so the stock WebPkiServerVerifier can check it; the
    // chain verification cost is the same as for a URI-only SVID.
    let leaf = |sa: &str, dns: Vec<String>| -> Res<Identity> {
        let mut p = CertificateParams::new(dns)?;
        p.distinguished_name.push(DnType::CommonName, sa);
        let uri = format!("spiffe://cluster.local/ns/default/sa/{sa}");
        p.subject_alt_names.push(SanType::URI(uri.try_into()?));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate_for(alg)?;
        let cert = p.signed_by(&key, &inter)?;
        Ok(Identity(
            vec![cert.der().clone(), inter.der().clone()],
            key.serialize_der(),
        ))
    };
    let server = leaf("server", vec!["server.test".into()])?;
    Ok(Pki {
        root: root.der().clone(),
        server,
        client: leaf("client", Vec::new())?,
    })
}

fn configs(provider: CryptoProvider, pki: &Pki) -> Res<Configs> {
    let provider = Arc::new(provider);
    let key = |id: &Identity| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.1.clone()));
    let mut roots = RootCertStore::empty();
    roots.add(pki.root.clone())?;
    let roots = Arc::new(roots);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(pki.server.0.clone(), key(&pki.server))?;
    server.send_tls13_tickets = 0;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone());
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(server_verifier.build()?)
        .with_client_auth_cert(pki.client.0.clone(), key(&pki.client))?;
    client.resumption = Resumption::disabled();
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Configs {
        client: Arc::new(client),
        server: Arc::new(server),
    })
}

/// The in-memory "wire": TLS bytes in flight, and a sink for received plaintext.
struct Pump {
    buf: Vec<u8>,
    sink: Vec<u8>,
}

impl Pump {
    fn new() -> Self {
        Pump {
            buf: Vec::new(),
            sink: vec![0; WRITE_SIZE],
        }
    }

    /// Moves every pending TLS byte from `from` to `to`, which processes it; returns the
    /// plaintext bytes `to` received (read into the sink and dropped).
    fn transfer(&mut self, from: &mut Connection, to: &mut Connection) -> Res<usize> {
        self.buf.clear();
        while from.wants_write() {
            from.write_tls(&mut self.buf)?;
        }
        let (mut rest, mut received) = (&self.buf[..], 0);
        while !rest.is_empty() {
            if to.read_tls(&mut rest)? == 0 {
                return Err("peer accepted no TLS bytes".into());
            }
            to.process_new_packets()?;
            loop {
                match to.reader().read(&mut self.sink) {
                    Ok(0) => break,
                    Ok(n) => received += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(received)
    }

    /// One full mutual-auth handshake; fails unless it completes as a full (not resumed)
    /// handshake with ALPN h2 and a verified client certificate.
    fn handshake(&mut self, c: &Configs) -> Res<(Connection, Connection)> {
        let name = ServerName::try_from("server.test")?;
        let mut client = Connection::Client(ClientConnection::new(c.client.clone(), name)?);
        let mut server = Connection::Server(ServerConnection::new(c.server.clone())?);
        for _ in 0..8 {
            self.transfer(&mut client, &mut server)?;
            self.transfer(&mut server, &mut client)?;
            if !client.is_handshaking() && !server.is_handshaking() {
                if client.alpn_protocol() != Some(b"h2")
                    || server.peer_certificates().is_none()
                    || client.handshake_kind() != Some(HandshakeKind::Full)
                {
                    return Err("handshake lacked h2 or a client certificate, or resumed".into());
                }
                return Ok((client, server));
            }
        }
        Err("handshake did not finish within 8 flights".into())
    }
}

fn handshake_rate(c: &Configs) -> Res<f64> {
    let (mut pump, start, mut done) = (Pump::new(), Instant::now(), 0);
    while done < HANDSHAKES_PER_ROUND && start.elapsed() < ROUND_TIME_LIMIT {
        pump.handshake(c)?;
        done += 1;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// MB/s (10^6 bytes) of application data client -> server after one (untimed) handshake.
fn bulk_rate(c: &Configs) -> Res<f64> {
    let mut pump = Pump::new();
    let (mut client, mut server) = pump.handshake(c)?;
    let data = vec![0xa5; WRITE_SIZE];
    let (start, mut sent, mut received) = (Instant::now(), 0, 0);
    while sent < BULK_BYTES && start.elapsed() < ROUND_TIME_LIMIT {
        client.writer().write_all(&data)?;
        sent += data.len();
        received += pump.transfer(&mut client, &mut server)?;
    }
    let secs = start.elapsed().as_secs_f64();
    if received != sent {
        return Err(format!("sent {sent} bytes but the server read {received}").into());
    }
    Ok(received as f64 / secs / 1e6)
}

/// Median and spread ((max - min) / median) of one cell's samples.
fn stats(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let median = (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0;
    (median, (v[v.len() - 1] - v[0]) / median)
}

/// "name version" of each crate, as locked in the Cargo.lock nearest the crate that built this.
fn locked_versions(names: &[&str]) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |d: &std::path::Path| std::fs::read_to_string(d.join("Cargo.lock")).ok();
    let lock = dir.ancestors().find_map(read).unwrap_or_default();
    let mut out = Vec::new();
    for n in names {
        let after = lock
            .split_once(&format!("name = \"{n}\"\nversion = \""))
            .map(|x| x.1);
        out.push(format!(
            "{n} {}",
            after.and_then(|r| r.split('"').next()).unwrap_or("?")
        ));
    }
    out.join(", ")
}

/// Builds the three configurations (default, AES-128-GCM, ChaCha20) of one provider, checks
/// with one handshake each that the expected suite is negotiated, and describes what was.
fn provider_configs(name: &str, make: MakeProvider, pki: &Pki) -> Res<(Vec<Configs>, String)> {
    let (mut cfgs, mut negotiated, mut pump) = (Vec::new(), Vec::new(), Pump::new());
    for want in SUITES {
        let mut p = make();
        p.cipher_suites
            .retain(|s| want.is_none_or(|w| s.suite() == w));
        let cfg = configs(p, pki)?;
        let (client, _) = pump.handshake(&cfg)?;
        let suite = client
            .negotiated_cipher_suite()
            .ok_or("no suite negotiated")?;
        if want.is_some_and(|w| w != suite.suite()) {
            return Err(format!("{name}: forced {want:?}, negotiated {:?}", suite.suite()).into());
        }
        let group = client
            .negotiated_key_exchange_group()
            .ok_or("no group negotiated")?;
        negotiated.push(format!("{:?}/{:?}", suite.suite(), group.name()));
        cfgs.push(cfg);
    }
    Ok((cfgs, negotiated.join(", ")))
}

fn print_row(label: &str, cells: impl Iterator<Item = String>) {
    println!(
        "{label:<15}{}",
        cells.map(|c| format!("{c:>20}")).collect::<String>()
    );
}

fn run() -> Res<()> {
    if cfg!(debug_assertions) {
        eprintln!("tls-bench: WARNING: debug build, the numbers are meaningless; use --release");
    }
    println!(
        "{}",
        locked_versions(&["rustls", "ring", "aws-lc-rs", "aws-lc-sys"])
    );
    let pki = pki()?;
    let mut cases = Vec::new();
    for (name, make) in PROVIDERS {
        let (cfgs, negotiated) = provider_configs(name, make, &pki)?;
        println!("{name:>9}: suite/group (default, forced, forced): {negotiated}");
        cases.push((name, cfgs, negotiated));
    }
    if cases[0].2 != cases[1].2 {
        println!("NOTE: the providers negotiate differently, so this is not like for like");
    }
    let mut samples = vec![vec![Vec::new(); COLUMNS.len()]; cases.len()];
    for round in 0..=ROUNDS {
        for i in 0..cases.len() {
            let p = (i + round) % cases.len(); // alternate which provider goes first
            let mut row = vec![handshake_rate(&cases[p].1[0])?];
            for cfg in &cases[p].1 {
                row.push(bulk_rate(cfg)?);
            }
            if round > 0 {
                samples[p].iter_mut().zip(row).for_each(|(s, v)| s.push(v));
            }
        }
    }
    println!(
        "\nmedian of {ROUNDS} rounds after a warm-up, (spread = (max-min)/median), MB = 10^6 B"
    );
    print_row("provider", COLUMNS.iter().map(|c| c.to_string()));
    for ((name, _, _), cols) in cases.iter().zip(&samples) {
        let cell = |s: &Vec<f64>| format!("{:.0} ({:.0}%)", stats(s).0, stats(s).1 * 100.0);
        print_row(name, cols.iter().map(cell));
    }
    let ratio = |c: usize| stats(&samples[1][c]).0 / stats(&samples[0][c]).0;
    print_row(
        "aws-lc-rs/ring",
        (0..COLUMNS.len()).map(|c| format!("{:.2}x", ratio(c))),
    );
    let noisy = samples.iter().flatten().any(|s| stats(s).1 > 0.2);
    if noisy {
        println!("NOTE: a spread is over 20%: the machine was noisy, treat small ratios as noise");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tls-bench: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
