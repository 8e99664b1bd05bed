//! Fuzzing the control API's request decoding (`api::decode_request`, what the daemon runs on
//! every line it reads): random bytes, random JSON built from the API's own vocabulary, and
//! mutations of valid requests. It must never panic; what it refuses gets a one-line error;
//! what it accepts is a valid request that survives a round trip.

use proptest::prelude::*;
use serde_json::{Value, json};
use xlb::api::{MAX_ERROR_CHARS, MAX_REQUEST_BYTES, Request, Response, decode_request};

/// One valid request of every kind, in several shapes.
fn corpus() -> Vec<Value> {
    let svc = "198.18.0.100:80/tcp";
    let full_service = json!({
        "service": svc, "mode": "dr", "ring_size": 65537, "hash": "5tuple",
        "reals": [{"addr": "198.18.0.11", "weight": 100}, {"addr": "198.18.0.12", "weight": 5, "draining": true}],
        "on_down": "move", "weights": "static",
        "check": {"kind": "http", "path": "/healthz", "expect_status": 200, "interval_ms": 1000,
                  "timeout_ms": 500, "rise": 2, "fall": 3},
    });
    let tun = json!({
        "service": "[fd00:18::200]:443/tcp", "mode": "tun", "ring_size": 251, "hash": "src-ip",
        "tunnel_src": "fd00:18::2", "fallback": "fd00:18::99",
        "reals": [{"addr": "fd00:18::11", "weight": 1,
                   "check": {"kind": "udp", "port": 53, "send": "00ff", "expect": "01"}}],
    });
    vec![
        json!({"request": "service-add", "config": {"service": svc}}),
        json!({"request": "service-add", "config": full_service}),
        json!({"request": "service-add", "config": tun}),
        json!({"request": "service-remove", "service": svc}),
        json!({"request": "service-list"}),
        json!({"request": "real-add", "service": svc, "real": {"addr": "198.18.0.11", "weight": 100}}),
        json!({"request": "real-add", "service": "198.18.0.100:0/udp",
               "real": {"addr": "198.18.0.11", "check": {"kind": "exec", "cmd": "true", "port": 9}}}),
        json!({"request": "real-remove", "service": svc, "addr": "198.18.0.11"}),
        json!({"request": "real-weight", "service": svc, "addr": "198.18.0.11", "weight": 65535}),
        json!({"request": "real-list", "service": svc}),
        json!({"request": "real-drain", "service": svc, "addr": "198.18.0.11"}),
        json!({"request": "real-enable", "service": svc, "addr": "198.18.0.11"}),
        json!({"request": "status"}),
        json!({"request": "stats"}),
        json!({"request": "save"}),
        json!({"request": "restore", "config": {"services": []}}),
        json!({"request": "restore", "config": {"services": [full_service, tun]}}),
    ]
}

/// The request as the CLI sends it: one line, newline-terminated.
fn line(v: &Value) -> Vec<u8> {
    let mut l = serde_json::to_vec(v).unwrap();
    l.push(b'\n');
    l
}

/// The property every outcome must have: a refusal is one line and bounded (as the daemon
/// sends it); an acceptance is a valid request that re-encodes to something decoding the same.
fn check_outcome(input: &[u8]) -> Result<(), TestCaseError> {
    match decode_request(input) {
        Err(e) => {
            let msg = Response::error(&e).error.unwrap();
            prop_assert!(!msg.is_empty());
            prop_assert!(
                !msg.chars().any(char::is_control),
                "error has control characters: {msg:?}"
            );
            prop_assert!(msg.chars().count() <= MAX_ERROR_CHARS + 3, "{msg}");
        }
        Ok(req) => {
            prop_assert!(req.validate().is_ok());
            let again = serde_json::to_vec(&req).unwrap();
            let back = decode_request(&again).map_err(|e| {
                TestCaseError::fail(format!("accepted {req:?} but not its own encoding: {e:#}"))
            })?;
            prop_assert_eq!(serde_json::to_vec(&back).unwrap(), again);
        }
    }
    Ok(())
}

/// Words the API uses, so random JSON often gets past the first field.
const KEYS: &[&str] = &[
    "request",
    "config",
    "service",
    "services",
    "real",
    "reals",
    "addr",
    "weight",
    "mode",
    "ring_size",
    "hash",
    "tunnel_src",
    "on_down",
    "fallback",
    "check",
    "weights",
    "draining",
    "kind",
    "port",
    "path",
    "expect_status",
    "send",
    "expect",
    "cmd",
    "interval_ms",
    "timeout_ms",
    "rise",
    "fall",
    "bogus",
];
const WORDS: &[&str] = &[
    "service-add",
    "service-remove",
    "service-list",
    "real-add",
    "real-remove",
    "real-weight",
    "real-list",
    "real-drain",
    "real-enable",
    "status",
    "stats",
    "save",
    "restore",
    "198.18.0.100:80/tcp",
    "[fd00::100]:443/udp",
    "198.18.0.100:0/udp",
    "198.18.0.100:80",
    "198.18.0.300:80/tcp",
    "198.18.0.11",
    "fd00::11",
    "0.0.0.0",
    "224.0.0.1",
    "127.0.0.1",
    "dr",
    "tun",
    "5tuple",
    "src-ip",
    "move",
    "keep",
    "static",
    "adaptive",
    "tcp",
    "http",
    "udp",
    "exec",
    "none",
    "/healthz",
    "0a0b",
    "xyz",
    "",
    "\n",
    "\u{0}",
    "\u{1b}[31m",
    "é",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop::sample::select(vec![
            0i64,
            1,
            2,
            7,
            100,
            251,
            65535,
            65536,
            65537,
            1 << 32,
            -1,
            i64::MIN,
            i64::MAX
        ])
        .prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(WORDS).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// A random request-shaped object: a known request name plus random fields.
fn request_like() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(&WORDS[..13]),
        prop::collection::vec((prop::sample::select(KEYS), json_value()), 0..4),
    )
        .prop_map(|(name, fields)| {
            let mut m: serde_json::Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            m.insert("request".into(), Value::from(name));
            Value::Object(m)
        })
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Delete(usize, usize),
    Insert(usize, Vec<u8>),
    Duplicate(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (
            any::<usize>(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 1..8),
                prop::sample::select(vec![
                    b"\"".to_vec(),
                    b",".to_vec(),
                    b"}".to_vec(),
                    b"{".to_vec(),
                    b"[".to_vec(),
                    b"9".to_vec(),
                    b"-".to_vec(),
                    b"\\".to_vec(),
                    b"\n".to_vec(),
                    b"null".to_vec(),
                    b"\xff".to_vec(),
                    b"\xc3".to_vec(),
                    b"e99999".to_vec()
                ]),
            ]
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1usize..32).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip(i, x) => {
                if !bytes.is_empty() {
                    bytes[i % len] ^= x;
                }
            }
            Mutation::Delete(i, n) => {
                let at = i % len;
                let end = (at + n).min(bytes.len());
                bytes.drain(at.min(end)..end);
            }
            Mutation::Insert(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Duplicate(i, n) => {
                let at = i % len;
                let end = (at + n).min(bytes.len());
                let piece = bytes[at.min(end)..end].to_vec();
                bytes.splice(end..end, piece);
            }
            Mutation::Truncate(i) => bytes.truncate(i % len),
        }
    }
    bytes
}

#[test]
fn every_corpus_request_is_accepted() {
    for v in corpus() {
        let req: Request = decode_request(&line(&v))
            .unwrap_or_else(|e| panic!("valid request refused: {v}: {e:#}"));
        // Accepted as the CLI sends it and without the newline too.
        decode_request(&serde_json::to_vec(&req).unwrap()).unwrap();
    }
}

#[test]
fn oversized_empty_and_multi_line_requests_are_refused() {
    let mut huge = br#"{"request":"status","pad":""#.to_vec();
    huge.resize(MAX_REQUEST_BYTES + 1, b' ');
    let e = format!("{:#}", decode_request(&huge).unwrap_err());
    assert!(e.contains("larger than"), "{e}");
    for empty in [&b""[..], b"\n", b"   \n", b"\r\n"] {
        let e = format!("{:#}", decode_request(empty).unwrap_err());
        assert!(e.contains("empty request"), "{empty:?}: {e}");
    }
    let e = format!(
        "{:#}",
        decode_request(b"{\"request\":\"status\"}\n{\"request\":\"save\"}\n").unwrap_err()
    );
    assert!(e.contains("one JSON object per line"), "{e}");
}

#[test]
fn a_huge_quoted_value_gives_a_short_error() {
    let name = "x".repeat(100_000) + "\n\u{1b}";
    let bad = line(&json!({ "request": name }));
    let e = Response::error(&decode_request(&bad).unwrap_err())
        .error
        .unwrap();
    assert!(e.starts_with("malformed request: unknown variant"), "{e}");
    assert!(e.chars().count() <= MAX_ERROR_CHARS + 3);
    assert!(!e.chars().any(char::is_control));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_outcome(&bytes)?;
    }

    #[test]
    fn random_json_never_panics(v in json_value()) {
        check_outcome(&line(&v))?;
    }

    #[test]
    fn random_request_shapes_never_panic(v in request_like()) {
        check_outcome(&line(&v))?;
    }

    #[test]
    fn mutated_valid_requests_never_panic(
        pick in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let corpus = corpus();
        let original = line(pick.get(&corpus));
        check_outcome(&mutate(original, &mutations))?;
    }

    /// A strict prefix of a request is never a request: a client cut off mid-line (the
    /// daemon reads to EOF) gets an error, never a shortened configuration.
    #[test]
    fn truncated_requests_are_refused(pick in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>()) {
        let corpus = corpus();
        let full = serde_json::to_vec(pick.get(&corpus)).unwrap();
        let at = cut.index(full.len());
        prop_assert!(decode_request(&full[..at]).is_err(), "{:?} accepted", String::from_utf8_lossy(&full[..at]));
    }
}
