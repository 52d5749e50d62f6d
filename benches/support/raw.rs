//! The raw baseline of the write benches: the rows fhirvault writes for a resource
//! (current-version row, version row with the ciphertext of the same plaintext and its digest,
//! compartment rows, search index rows), built as the server builds them and inserted with one
//! multi-row INSERT per table in one transaction.

use diesel::prelude::*;
use fhirvault::crypto::{Aad, Cipher};
use fhirvault::store::encrypted::EncryptedColumn;
use fhirvault::store::schema::{resource_compartments as rc, resource_versions as rv, resources as cur};
use fhirvault::store::DbConnection;
use serde_json::Value;

/// One resource's rows, built as the server builds them.
pub struct Rows {
    t: String,
    id: String,
    sealed: fhirvault::crypto::Sealed,
    digest: Vec<u8>,
    patients: Vec<String>,
    index: Vec<fhirvault::store::search_index::SearchRow>,
}

pub fn build_rows(
    bundle: &Value,
    registry: &fhirvault::search::Registry,
    compartment: &fhirvault::fhir::compartment::PatientCompartment,
    cipher: &Cipher,
) -> Vec<Rows> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let r = &e["resource"];
            let t = r["resourceType"].as_str().unwrap().to_string();
            let id = uuid::Uuid::new_v4().to_string();
            let plain = serde_json::to_vec(r).unwrap();
            let aad = Aad {
                table: "resource_versions",
                resource_type: &t,
                logical_id: &id,
                version_id: 1,
            };
            Rows {
                sealed: cipher.seal(&aad, &plain).unwrap(),
                digest: fhirvault::crypto::sha256(&plain).to_vec(),
                patients: compartment.patients_of(&t, r).into_iter().collect(),
                index: fhirvault::search::index_rows(registry, cipher, &t, r),
                t,
                id,
            }
        })
        .collect()
}

/// The rows of one bundle in one transaction, one multi-row INSERT per table.
pub fn insert_rows(c: &mut DbConnection, rows: &[Rows]) {
    let now = fhirvault::store::now();
    c.transaction::<_, diesel::result::Error, _>(|c| {
        let current: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    cur::resource_type.eq(&r.t),
                    cur::logical_id.eq(&r.id),
                    cur::version_id.eq(1i64),
                    cur::last_updated.eq(now),
                    cur::deleted.eq(false),
                )
            })
            .collect();
        let versions: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    rv::resource_type.eq(&r.t),
                    rv::logical_id.eq(&r.id),
                    rv::version_id.eq(1i64),
                    rv::last_updated.eq(now),
                    rv::deleted.eq(false),
                    rv::method.eq("POST"),
                    rv::key_version.eq(Some(1)),
                    rv::content.eq(Some(EncryptedColumn(r.sealed.clone()))),
                    rv::content_sha256.eq(Some(r.digest.clone())),
                )
            })
            .collect();
        let compartments: Vec<_> = rows
            .iter()
            .flat_map(|r| {
                r.patients.iter().map(move |p| {
                    (
                        rc::resource_type.eq(&r.t),
                        rc::logical_id.eq(&r.id),
                        rc::version_id.eq(1i64),
                        rc::patient_id.eq(p),
                    )
                })
            })
            .collect();
        // bounded by the backends' bind limits: chunks of 1,000 rows
        macro_rules! many {
            ($table:expr, $rows:expr) => {
                for chunk in $rows.chunks(1000) {
                    match c {
                        DbConnection::Pg(pg) => diesel::insert_into($table).values(chunk).execute(pg)?,
                        DbConnection::Sqlite(s) => diesel::insert_into($table).values(chunk).execute(s)?,
                    };
                }
            };
        }
        many!(cur::table, current);
        many!(rc::table, compartments);
        many!(rv::table, versions);
        let items: Vec<(&str, &str, &[fhirvault::store::search_index::SearchRow])> = rows
            .iter()
            .map(|r| (r.t.as_str(), r.id.as_str(), r.index.as_slice()))
            .collect();
        fhirvault::store::search_index::insert_many(c, &items)
            .map_err(|_| diesel::result::Error::RollbackTransaction)?;
        Ok(())
    })
    .unwrap();
}
