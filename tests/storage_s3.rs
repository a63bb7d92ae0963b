//! The shared Storage and Backend conformance suites against real S3 servers: Garage (as users
//! run it, and in CI) and moto's server, which, unlike Garage, honours conditional writes.

mod common;

use common::S3Env;
use nbds3::storage::{conformance, s3, Backend, S3Backend, S3Config, S3Storage};
use nbds3::ExportName;

/// Runs every conformance check on `env`'s server; returns whether its leases are atomic.
fn conformance_on(env: &S3Env) -> bool {
    let config: S3Config = env.config(common::TEST_BUCKET);
    let client = s3::runtime().unwrap().block_on(s3::client(&config));
    let run = common::unique("conformance");
    conformance::run_all(
        &|place| {
            let export = ExportName::new(&format!("{run}-{place}")).unwrap();
            Box::new(S3Storage::new(client.clone(), &config, &export, conformance::BLOCK_SIZE))
        },
        true,
    );
    let backend = S3Backend::new(&config).unwrap();
    conformance::backend_records(&backend, &format!("{run}-rec-"));
    conformance::backend_leases(&backend, &format!("{run}-lease-"));
    let atomic = backend.atomic_leases().unwrap();
    assert!(env.list(common::TEST_BUCKET, "leases/probe/").is_empty(), "the conditional-write probe is cleaned up");
    atomic
}

/// `S3Storage` keeps the same contract as the memory and file backends, on Garage. Garage 2.5
/// ignores conditional writes, and the backend finds that out (by probing) rather than trusting
/// them; the lease checks then run without the compare-and-swap assertions.
#[test]
fn s3_storage_conformance() {
    let Some(env) = common::s3() else { return };
    let atomic = conformance_on(&env);
    eprintln!("this S3 server {} conditional writes", if atomic { "honours" } else { "ignores" });
}

/// On a server with conditional writes, leases are compare-and-swaps: racing creators, stale
/// versions and re-creations are refused (the checks `backend_leases` runs when atomic).
#[test]
fn s3_conformance_with_conditional_writes() {
    let Some(moto) = common::moto() else { return };
    assert!(conformance_on(&moto.env), "moto honours If-None-Match and If-Match");
}
