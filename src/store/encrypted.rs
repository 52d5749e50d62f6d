//! The `Encrypted` SQL type: a column that only ever holds [`Sealed`] ciphertext.
//!
//! The Rust side of the column is [`EncryptedColumn`], which can only be built from a
//! [`Sealed`] value, and only `crypto::Cipher::seal` makes those from plaintext: storing
//! plaintext in an encrypted column does not type-check.

use crate::crypto::Sealed;
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::pg::Pg;
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{Binary, HasSqlType, SqlType};
use diesel::sqlite::Sqlite;

use super::connection::MultiBackend;

/// BYTEA on PostgreSQL (declared by oid: 17, array 1001), BLOB on SQLite.
#[derive(Debug, Clone, Copy, Default, SqlType, diesel::query_builder::QueryId)]
#[diesel(postgres_type(oid = 17, array_oid = 1001))]
#[diesel(sqlite_type(name = "Binary"))]
pub struct Encrypted;

#[derive(Debug, Clone, PartialEq, Eq, AsExpression, FromSqlRow)]
#[diesel(sql_type = Encrypted)]
pub struct EncryptedColumn(pub Sealed);

impl ToSql<Encrypted, Sqlite> for EncryptedColumn {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        <[u8] as ToSql<Binary, Sqlite>>::to_sql(self.0.as_bytes(), out)
    }
}

impl FromSql<Encrypted, Sqlite> for EncryptedColumn {
    fn from_sql(bytes: <Sqlite as diesel::backend::Backend>::RawValue<'_>) -> deserialize::Result<Self> {
        let v = <Vec<u8> as FromSql<Binary, Sqlite>>::from_sql(bytes)?;
        Ok(EncryptedColumn(Sealed::from_stored(v)))
    }
}

impl ToSql<Encrypted, Pg> for EncryptedColumn {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <[u8] as ToSql<Binary, Pg>>::to_sql(self.0.as_bytes(), out)
    }
}

impl FromSql<Encrypted, Pg> for EncryptedColumn {
    fn from_sql(bytes: diesel::pg::PgValue<'_>) -> deserialize::Result<Self> {
        let v = <Vec<u8> as FromSql<Binary, Pg>>::from_sql(bytes)?;
        Ok(EncryptedColumn(Sealed::from_stored(v)))
    }
}

impl HasSqlType<Encrypted> for MultiBackend {
    fn metadata(lookup: &mut Self::MetadataLookup) -> Self::TypeMetadata {
        MultiBackend::lookup_sql_type::<Encrypted>(lookup)
    }
}

impl FromSql<Encrypted, MultiBackend> for EncryptedColumn {
    fn from_sql(bytes: <MultiBackend as diesel::backend::Backend>::RawValue<'_>) -> deserialize::Result<Self> {
        bytes.from_sql::<EncryptedColumn, Encrypted>()
    }
}

impl ToSql<Encrypted, MultiBackend> for EncryptedColumn {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, MultiBackend>) -> serialize::Result {
        out.set_value((Encrypted, self));
        Ok(IsNull::No)
    }
}
