//! The database's schema and roles: migrations (embedded, both backends), the grants the
//! tables' owner gives the serving role on PostgreSQL, and whether row-level security binds it.

use super::{Access, DbConnection, Store, StoreError};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// The owner grants the server's role row access (PostgreSQL): no DDL, no ownership;
/// versions, compartments and the audit ledger are insert-only (archiving audit rows needs the owner).
pub(super) fn grant_server_role(owner: &mut DbConnection, server: &mut DbConnection) -> Result<(), StoreError> {
    let (DbConnection::Pg(owner), DbConnection::Pg(server)) = (owner, server) else {
        return Ok(());
    };
    #[derive(QueryableByName)]
    struct Role {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let role: Role = diesel::sql_query("SELECT current_user::text AS name").get_result(server)?;
    let ident = format!("\"{}\"", role.name.replace('"', "\"\""));
    owner.batch_execute(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON resources TO {ident}; \
         GRANT SELECT, INSERT ON resource_versions, resource_compartments TO {ident}; \
         GRANT USAGE, SELECT ON SEQUENCE resource_versions_id_seq TO {ident}; \
         GRANT SELECT, INSERT ON audit_events, audit_search, audit_entities, audit_chains, audit_chain, \
               audit_checkpoints TO {ident}; \
         GRANT SELECT, INSERT, UPDATE ON audit_index_progress TO {ident}; \
         GRANT SELECT ON audit_archives TO {ident}; \
         GRANT SELECT, INSERT, DELETE ON search_string, search_token, search_date, search_reference, \
               search_number, search_quantity, search_uri, search_composite, search_pages TO {ident}; \
         GRANT SELECT, INSERT, UPDATE ON search_settings TO {ident}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON export_jobs, export_files TO {ident}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON auth_users, auth_clients, auth_sessions, auth_codes, \
               auth_refresh_tokens, auth_launches, auth_assertions, auth_revoked_tokens TO {ident}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON subscription_state, subscription_outbox TO {ident}; \
         GRANT USAGE, SELECT ON SEQUENCE subscription_outbox_id_seq TO {ident}; \
         GRANT SELECT, INSERT, UPDATE ON break_glass_uses TO {ident};"
    ))?;
    Ok(())
}

/// Says at start-up when PostgreSQL's row-level security cannot bind the server's role.
pub(super) fn warn_if_rls_bypassed(conn: &mut DbConnection) -> Result<(), StoreError> {
    let DbConnection::Pg(pg) = conn else { return Ok(()) };
    #[derive(QueryableByName)]
    struct Bypass {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        bypass: bool,
    }
    let b: Bypass = diesel::sql_query(
        "SELECT (r.rolsuper OR r.rolbypassrls OR t.tableowner = current_user) AS bypass \
         FROM pg_roles r, pg_tables t WHERE r.rolname = current_user AND t.tablename = 'resource_versions'",
    )
    .get_result(pg)?;
    if b.bypass {
        tracing::warn!(
            "row-level security does not bind this database role (superuser, BYPASSRLS or table owner): \
             serve as a dedicated role and run migrations with migration_database_url"
        );
    }
    Ok(())
}

/// Whether PostgreSQL's row-level security binds the role the server connects as.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RlsBinding {
    pub role: String,
    pub superuser: bool,
    pub bypass_rls: bool,
    pub owns_tables: bool,
}

impl RlsBinding {
    pub fn binds(&self) -> bool {
        !(self.superuser || self.bypass_rls || self.owns_tables)
    }
}

impl Store {
    /// How row-level security stands for the serving role; `None` on SQLite (none there).
    pub fn rls_binding(&self) -> Result<Option<RlsBinding>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let DbConnection::Pg(pg) = &mut conn.conn else {
            return Ok(None);
        };
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            role: String,
            #[diesel(sql_type = diesel::sql_types::Bool)]
            superuser: bool,
            #[diesel(sql_type = diesel::sql_types::Bool)]
            bypass_rls: bool,
            #[diesel(sql_type = diesel::sql_types::Bool)]
            owns_tables: bool,
        }
        let r: Row = diesel::sql_query(
            "SELECT current_user::text AS role, r.rolsuper AS superuser, r.rolbypassrls AS bypass_rls, \
             (t.tableowner = current_user) AS owns_tables \
             FROM pg_roles r, pg_tables t WHERE r.rolname = current_user AND t.tablename = 'resource_versions'",
        )
        .get_result(pg)?;
        Ok(Some(RlsBinding {
            role: r.role,
            superuser: r.superuser,
            bypass_rls: r.bypass_rls,
            owns_tables: r.owns_tables,
        }))
    }
}

/// The advisory lock several nodes starting at once take around migrations (PostgreSQL).
const MIGRATION_LOCK: i64 = 0x6676_6d69_6772;

/// Runs the migrations of the backend `conn` is on. On PostgreSQL, nodes starting at once
/// take turns (a session advisory lock): the first applies them, the others find none pending.
pub fn run_migrations(conn: &mut DbConnection) -> Result<Vec<String>, StoreError> {
    let applied = match conn {
        DbConnection::Pg(c) => {
            diesel::sql_query("SELECT pg_advisory_lock($1)")
                .bind::<diesel::sql_types::BigInt, _>(MIGRATION_LOCK)
                .execute(c)?;
            let applied = c
                .run_pending_migrations(PG_MIGRATIONS)
                .map(|v| v.iter().map(|m| m.to_string()).collect::<Vec<_>>());
            diesel::sql_query("SELECT pg_advisory_unlock($1)")
                .bind::<diesel::sql_types::BigInt, _>(MIGRATION_LOCK)
                .execute(c)?;
            applied
        }
        DbConnection::Sqlite(c) => c
            .run_pending_migrations(SQLITE_MIGRATIONS)
            .map(|v| v.iter().map(|m| m.to_string()).collect::<Vec<_>>()),
    }
    .map_err(|e| StoreError::Migration(e.to_string()))?;
    Ok(applied)
}
