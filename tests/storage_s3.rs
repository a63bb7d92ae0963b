//! The shared Storage conformance suite against a real S3 server (Garage in CI).

mod common;

use nbds3::storage::{conformance, s3, S3Config, S3Storage};
use nbds3::ExportName;

/// `S3Storage` keeps the same contract as the memory and file backends.
#[test]
fn s3_storage_conformance() {
    let Some(env) = common::s3() else { return };
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
    conformance::backend_records(&nbds3::storage::S3Backend::new(&config).unwrap(), &format!("{run}-rec-"));
}
