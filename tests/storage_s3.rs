//! The shared Storage and Backend conformance suites against real S3 servers: the one under test
//! (SeaweedFS, then Garage, in CI) and, where that one ignores conditional writes, a private
//! SeaweedFS for the compare-and-swap checks.

mod common;

use common::S3Env;
use std::sync::Arc;

use nbds3::storage::s3::{self, S3Objects, Transport};
use nbds3::storage::{conformance, objects, Backend, BlockBuf, PlainStorage, S3Config};
use nbds3::{BlockId, Error, ExportName, Storage};

/// The blocks of `export`, `block_size` bytes each, in `config`'s bucket through `transport`.
fn blocks(transport: &Transport, config: &S3Config, export: &ExportName, block_size: usize) -> PlainStorage {
    PlainStorage::new(Arc::new(S3Objects::new(transport.clone(), config)), export, block_size)
}

/// Runs every conformance check on `env`'s server, with block requests both ways (the direct path
/// http:// endpoints take, and the SDK's, which https:// endpoints take); returns whether its
/// leases are atomic.
fn conformance_on(env: &S3Env) -> bool {
    let config: S3Config = env.config(common::TEST_BUCKET);
    let transport = s3::runtime().unwrap().block_on(Transport::new(&config));
    assert!(transport.is_direct(), "an http:// endpoint with static keys: block requests go direct");
    let run = common::unique("conformance");
    for (path, transport) in [("direct", transport.clone()), ("sdk", transport.without_direct())] {
        conformance::run_all(
            &|place| {
                let export = ExportName::new(&format!("{run}-{path}-{place}")).unwrap();
                Box::new(blocks(&transport, &config, &export, conformance::BLOCK_SIZE))
            },
            true,
        );
        objects::conformance::all(&S3Objects::new(transport, &config));
    }
    let backend = s3::backend(&config).unwrap();
    conformance::backend_records(&backend, &format!("{run}-rec-"));
    conformance::backend_leases(&backend, &format!("{run}-lease-"));
    let atomic = backend.atomic_leases().unwrap();
    // This process's probes only: other tests' may be under way, and a process killed while
    // probing leaves its probe behind.
    let ours = format!("leases/probe/{}-", std::process::id());
    assert!(env.list(common::TEST_BUCKET, &ours).is_empty(), "the conditional-write probe is cleaned up");
    atomic
}

/// The S3 store keeps the same contracts (objects, blocks, records, leases) as the memory and
/// file stores, on the server under
/// test. Where that ignores conditional writes (Garage 2.5), the backend finds that out (by
/// probing) rather than trusting them; the lease checks then run without the compare-and-swap
/// assertions.
#[test]
fn s3_storage_conformance() {
    let Some(env) = common::s3() else { return };
    let atomic = conformance_on(&env);
    assert_eq!(atomic, env.conditional_writes(), "the backend's probe and the tests' agree");
    common::note(&format!("{} {} conditional writes", env.name(), if atomic { "honours" } else { "ignores" }));
}

/// On a server with conditional writes, leases are compare-and-swaps: racing creators, stale
/// versions and re-creations are refused (the checks `backend_leases` runs when atomic). Where
/// the server under test honours them, `s3_storage_conformance` has run these checks on it;
/// where it does not, they run here on a private SeaweedFS, so that every pass runs them.
#[test]
fn s3_conformance_with_conditional_writes() {
    let Some(env) = common::s3() else { return };
    if env.conditional_writes() {
        common::note(&format!("not run: s3_storage_conformance runs these checks on {}", env.name()));
        return;
    }
    let Some(private) = common::seaweedfs() else { return };
    common::note(&format!("ran on a private SeaweedFS: {} ignores conditional writes", env.name()));
    assert!(conformance_on(&private.env), "SeaweedFS honours If-None-Match and If-Match");
}

/// Block requests refused by the server fail with the reason, by category, both ways: a wrong
/// secret is "credentials rejected"; a key without access to the bucket is "permission denied"
/// (AccessDenied, as AWS and SeaweedFS answer), or "not found" on Garage, which hides the bucket
/// from it (NoSuchBucket); none is retried into a timeout, and a refused PUT of a whole 1 MiB
/// body (which a server may refuse before reading it) says why too.
#[test]
fn refused_block_requests_say_why() {
    let Some(env) = common::s3() else { return };
    let limited = common::S3Env {
        access_key: std::env::var("NBDS3_S3_LIMITED_KEY_ID").expect("scripts/seaweedfs env"),
        secret_key: std::env::var("NBDS3_S3_LIMITED_SECRET").expect("scripts/seaweedfs env"),
        ..env.clone()
    };
    let no_access = if env.server == "garage" { "not found" } else { "permission denied" };
    let wrong_secret = common::S3Env { secret_key: "0".repeat(64), ..env.clone() };
    let export = ExportName::new(&common::unique("refused")).unwrap();
    let config = env.config(common::TEST_BUCKET);
    let written = blocks(&s3::runtime().unwrap().block_on(Transport::new(&config)), &config, &export, 4096);
    written.write_block(BlockId(1), &[7; 4096]).unwrap();
    for (who, env, expected) in
        [("a wrong secret", wrong_secret, "credentials rejected"), ("a key without access", limited, no_access)]
    {
        let config = S3Config { timeout: std::time::Duration::from_secs(20), ..env.config(common::TEST_BUCKET) };
        let transport = s3::runtime().unwrap().block_on(Transport::new(&config));
        for (path, transport) in [("direct", transport.clone()), ("sdk", transport.without_direct())] {
            let store = blocks(&transport, &config, &export, 4096);
            let big = blocks(&transport, &config, &export, 1 << 20);
            let big_block = vec![9; 1 << 20];
            let requests: [(&str, &dyn Fn() -> nbds3::Result<()>); 3] = [
                ("GET", &|| store.read_block(BlockId(1), &mut BlockBuf::zeroed(4096)).map(drop)),
                ("PUT", &|| big.write_block(BlockId(3), &big_block)),
                ("DELETE", &|| store.delete_block(BlockId(1))),
            ];
            for (what, request) in requests {
                let started = std::time::Instant::now();
                let err = request().unwrap_err();
                assert!(err.to_string().contains(expected), "{who}, {path}, {what}: {err}");
                assert!(err.to_string().contains(what), "{who}, {path}, {what}: {err}");
                assert!(
                    !matches!(err, Error::Timeout { .. } | Error::Backend { .. }),
                    "{who}, {path}, {what}: {err:?}"
                );
                assert!(started.elapsed().as_secs() < 10, "{who}, {path}, {what}: retried for {:?}", started.elapsed());
            }
        }
    }
    let mut buf = BlockBuf::zeroed(4096);
    assert!(written.read_block(BlockId(1), &mut buf).unwrap(), "no refused DELETE deleted it");
    assert_eq!(&buf[..], &[7; 4096][..]);
    written.delete_block(BlockId(1)).unwrap();
}
