//! The authorization server's rows: users, clients, browser sessions, authorization codes,
//! refresh-token families, EHR launch values, seen client assertions and revoked access tokens.
//! Bearer secrets (session cookie, code, refresh token, launch value) arrive here only as their
//! SHA-256; the caller hashes them. Every operation whose correctness depends on "only once"
//! (a code, a refresh token, a TOTP step, an assertion's jti) is one conditional statement or one
//! transaction, so two nodes racing on the same secret cannot both win.

use super::schema::{
    auth_assertions as aa, auth_clients as ac, auth_codes as acode, auth_launches as al, auth_refresh_tokens as ar,
    auth_revoked_tokens as arv, auth_sessions as asess, auth_users as au,
};
use super::{Access, Store, StoreError};
use chrono::NaiveDateTime;
use diesel::prelude::*;

/// One user account.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = au)]
pub struct UserRow {
    pub id: String,
    pub username: String,
    pub password_hash: String,
    pub fhir_user: Option<String>,
    /// Space-separated role names (the token's `roles` claim).
    pub roles: String,
    /// Sealed TOTP secret; `None` until the user has enrolled a second factor.
    pub totp_secret: Option<Vec<u8>>,
    pub totp_last_step: i64,
    pub disabled: bool,
    pub failed_logins: i32,
    pub locked_until: Option<NaiveDateTime>,
    pub created_at: NaiveDateTime,
}

/// One registered client.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = ac)]
pub struct ClientRow {
    pub client_id: String,
    pub name: String,
    /// `public` or `confidential`.
    pub client_type: String,
    pub secret_hash: Option<String>,
    /// A JWK Set (JSON) for `private_key_jwt`.
    pub jwks: Option<String>,
    pub jwks_uri: Option<String>,
    /// One redirect URI per line.
    pub redirect_uris: String,
    /// The scopes the client may be granted (space-separated).
    pub scopes: String,
    pub disabled: bool,
    pub created_at: NaiveDateTime,
}

/// A browser's sign-in, with the user it belongs to.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = asess)]
pub struct SessionRow {
    pub user_id: String,
    pub mfa_done: bool,
    pub amr: String,
    pub created_at: NaiveDateTime,
    pub last_seen: NaiveDateTime,
}

/// What an authorization code stands for.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = acode)]
pub struct CodeRow {
    pub code_hash: Vec<u8>,
    pub client_id: String,
    pub user_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub code_challenge: String,
    pub nonce: Option<String>,
    pub amr: String,
    pub auth_time: NaiveDateTime,
    pub expires_at: NaiveDateTime,
}

/// One refresh token of a family.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = ar)]
pub struct RefreshRow {
    pub token_hash: Vec<u8>,
    pub family_id: String,
    pub client_id: String,
    pub user_id: Option<String>,
    pub scope: String,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub amr: String,
    /// `active`, `spent` (rotated) or `revoked`.
    pub status: String,
    pub issued_at: NaiveDateTime,
    pub idle_expires_at: NaiveDateTime,
    pub family_expires_at: NaiveDateTime,
}

/// What presenting a refresh token came to.
#[derive(Debug)]
pub enum RefreshUse {
    /// Spent; the new token (already stored) continues the family.
    Rotated(Box<RefreshRow>),
    /// A spent token was presented again: its whole family is now revoked.
    Replayed { client_id: String },
    /// Unknown, revoked, or past its idle or absolute lifetime.
    Invalid,
}

/// An EHR launch context.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = al)]
pub struct LaunchRow {
    pub launch_hash: Vec<u8>,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub client_id: Option<String>,
    pub expires_at: NaiveDateTime,
}

/// A new user account.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub id: String,
    pub username: String,
    pub password_hash: String,
    pub fhir_user: Option<String>,
    pub roles: String,
    pub totp_secret: Option<Vec<u8>>,
}

const ACTIVE: &str = "active";
const SPENT: &str = "spent";
const REVOKED: &str = "revoked";

impl Store {
    /// One write statement: atomic by itself, so without BEGIN and COMMIT around it (one round
    /// trip on PostgreSQL), and serialized with every other write on SQLite.
    fn auth_exec(
        &self,
        f: impl FnOnce(&mut super::DbConnection) -> diesel::QueryResult<usize>,
    ) -> Result<usize, StoreError> {
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = f(&mut conn.conn).map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    fn auth_read<T>(&self, f: impl FnOnce(&mut super::DbConnection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = f(&mut conn.conn);
        super::note(&mut conn, result)
    }

    pub fn auth_user_count(&self) -> Result<i64, StoreError> {
        self.auth_read(|c| Ok(au::table.count().get_result(c)?))
    }

    /// Adds a user (a unique violation if the username is taken).
    pub fn auth_user_add(&self, user: &NewUser) -> Result<(), StoreError> {
        self.auth_exec(|c| {
            diesel::insert_into(au::table)
                .values((
                    au::id.eq(&user.id),
                    au::username.eq(&user.username),
                    au::password_hash.eq(&user.password_hash),
                    au::fhir_user.eq(&user.fhir_user),
                    au::roles.eq(&user.roles),
                    au::totp_secret.eq(&user.totp_secret),
                    au::created_at.eq(super::now()),
                ))
                .execute(c)
        })
        .map(|_| ())
    }

    pub fn auth_user_by_name(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        self.auth_read(|c| {
            Ok(au::table
                .filter(au::username.eq(username))
                .select(UserRow::as_select())
                .first(c)
                .optional()?)
        })
    }

    pub fn auth_user(&self, id: &str) -> Result<Option<UserRow>, StoreError> {
        self.auth_read(|c| Ok(au::table.find(id).select(UserRow::as_select()).first(c).optional()?))
    }

    pub fn auth_users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.auth_read(|c| Ok(au::table.order(au::username).select(UserRow::as_select()).load(c)?))
    }

    /// Disables (or re-enables) an account and ends its sessions and refresh tokens. False if
    /// there is no such user.
    pub fn auth_user_set_disabled(&self, username: &str, disabled: bool) -> Result<bool, StoreError> {
        self.write_tx(&Access::All, |c| {
            let id: Option<String> = au::table
                .filter(au::username.eq(username))
                .select(au::id)
                .first(c)
                .optional()?;
            let Some(id) = id else { return Ok(false) };
            diesel::update(au::table.find(&id))
                .set(au::disabled.eq(disabled))
                .execute(c)?;
            if disabled {
                end_user_grants(c, &id)?;
            }
            Ok(true)
        })
    }

    /// Removes the user's second factor (they enrol again at their next sign-in) and ends their
    /// sessions and refresh tokens. False if there is no such user.
    pub fn auth_user_reset_mfa(&self, username: &str) -> Result<bool, StoreError> {
        self.write_tx(&Access::All, |c| {
            let id: Option<String> = au::table
                .filter(au::username.eq(username))
                .select(au::id)
                .first(c)
                .optional()?;
            let Some(id) = id else { return Ok(false) };
            diesel::update(au::table.find(&id))
                .set((au::totp_secret.eq(None::<Vec<u8>>), au::totp_last_step.eq(0i64)))
                .execute(c)?;
            end_user_grants(c, &id)?;
            Ok(true)
        })
    }

    /// Stores the (sealed) TOTP secret of a user who just proved they hold it, and the time
    /// step of that proof (never accepted again). False if the user enrolled meanwhile.
    pub fn auth_user_enrol_totp(&self, id: &str, sealed_secret: &[u8], step: i64) -> Result<bool, StoreError> {
        Ok(self.auth_exec(|c| {
            diesel::update(au::table.find(id).filter(au::totp_secret.is_null()))
                .set((au::totp_secret.eq(sealed_secret), au::totp_last_step.eq(step)))
                .execute(c)
        })? == 1)
    }

    /// Accepts a TOTP time step for the user only if it is later than every step accepted
    /// before: a code (even a valid one) works once.
    pub fn auth_user_accept_totp_step(&self, id: &str, step: i64) -> Result<bool, StoreError> {
        Ok(self.auth_exec(|c| {
            diesel::update(au::table.find(id).filter(au::totp_last_step.lt(step)))
                .set(au::totp_last_step.eq(step))
                .execute(c)
        })? == 1)
    }

    /// Counts a failed sign-in; at `max_failures` in a row the account is locked until `until`.
    pub fn auth_user_login_failed(&self, id: &str, max_failures: i32, until: NaiveDateTime) -> Result<(), StoreError> {
        self.write_tx(&Access::All, |c| {
            diesel::update(au::table.find(id))
                .set(au::failed_logins.eq(au::failed_logins + 1))
                .execute(c)?;
            diesel::update(au::table.find(id).filter(au::failed_logins.ge(max_failures)))
                .set((au::locked_until.eq(Some(until)), au::failed_logins.eq(0)))
                .execute(c)?;
            Ok(())
        })
    }

    pub fn auth_user_login_succeeded(&self, id: &str) -> Result<(), StoreError> {
        self.auth_exec(|c| {
            diesel::update(au::table.find(id))
                .set((
                    au::failed_logins.eq(0),
                    au::locked_until.eq(None::<NaiveDateTime>),
                    au::last_sign_in_at.eq(super::now()),
                ))
                .execute(c)
        })
        .map(|_| ())
    }

    /// Every sealed TOTP secret with its user (key rotation re-encrypts those under old keys).
    pub fn auth_totp_secrets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.auth_read(|c| {
            let rows: Vec<(String, Option<Vec<u8>>)> = au::table
                .filter(au::totp_secret.is_not_null())
                .select((au::id, au::totp_secret))
                .load(c)?;
            Ok(rows.into_iter().filter_map(|(id, s)| s.map(|s| (id, s))).collect())
        })
    }

    /// Replaces a sealed TOTP secret with its re-encryption (only if it is still `old`).
    pub fn auth_replace_totp_secret(&self, id: &str, old: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        Ok(self.auth_exec(|c| {
            diesel::update(au::table.find(id).filter(au::totp_secret.eq(old)))
                .set(au::totp_secret.eq(new))
                .execute(c)
        })? == 1)
    }

    pub fn auth_client_add(&self, client: &ClientRow) -> Result<(), StoreError> {
        self.auth_exec(|c| diesel::insert_into(ac::table).values(client).execute(c))
            .map(|_| ())
    }

    pub fn auth_client(&self, client_id: &str) -> Result<Option<ClientRow>, StoreError> {
        self.auth_read(|c| {
            Ok(ac::table
                .find(client_id)
                .select(ClientRow::as_select())
                .first(c)
                .optional()?)
        })
    }

    pub fn auth_clients(&self) -> Result<Vec<ClientRow>, StoreError> {
        self.auth_read(|c| Ok(ac::table.order(ac::client_id).select(ClientRow::as_select()).load(c)?))
    }

    /// Records that `client_id` was issued a token now.
    pub fn auth_client_used(&self, client_id: &str) -> Result<(), StoreError> {
        self.auth_exec(|c| {
            diesel::update(ac::table.find(client_id))
                .set(ac::last_token_at.eq(super::now()))
                .execute(c)
        })
        .map(|_| ())
    }

    /// When each user last signed in and each client was last issued a token (access review).
    #[allow(clippy::type_complexity)]
    pub fn auth_last_use(
        &self,
    ) -> Result<
        (
            Vec<(String, Option<NaiveDateTime>)>,
            Vec<(String, Option<NaiveDateTime>)>,
        ),
        StoreError,
    > {
        self.auth_read(|c| {
            let users = au::table.select((au::username, au::last_sign_in_at)).load(c)?;
            let clients = ac::table.select((ac::client_id, ac::last_token_at)).load(c)?;
            Ok((users, clients))
        })
    }

    /// Disables a client and revokes its refresh tokens. False if there is no such client.
    pub fn auth_client_disable(&self, client_id: &str) -> Result<bool, StoreError> {
        self.write_tx(&Access::All, |c| {
            let n = diesel::update(ac::table.find(client_id))
                .set(ac::disabled.eq(true))
                .execute(c)?;
            diesel::update(ar::table.filter(ar::client_id.eq(client_id)))
                .set(ar::status.eq(REVOKED))
                .execute(c)?;
            diesel::delete(acode::table.filter(acode::client_id.eq(client_id))).execute(c)?;
            Ok(n == 1)
        })
    }

    pub fn auth_session_create(
        &self,
        id_hash: &[u8],
        user_id: &str,
        mfa_done: bool,
        amr: &str,
    ) -> Result<(), StoreError> {
        let now = super::now();
        self.auth_exec(|c| {
            diesel::insert_into(asess::table)
                .values((
                    asess::id_hash.eq(id_hash),
                    asess::user_id.eq(user_id),
                    asess::mfa_done.eq(mfa_done),
                    asess::amr.eq(amr),
                    asess::created_at.eq(now),
                    asess::last_seen.eq(now),
                ))
                .execute(c)
        })
        .map(|_| ())
    }

    /// The session, if it has been used since `idle_since` and its user is enabled; its last
    /// use becomes now. A session idle for longer is deleted.
    pub fn auth_session_touch(
        &self,
        id_hash: &[u8],
        idle_since: NaiveDateTime,
    ) -> Result<Option<(SessionRow, UserRow)>, StoreError> {
        self.write_tx(&Access::All, |c| {
            let found: Option<(SessionRow, UserRow)> = asess::table
                .inner_join(au::table.on(au::id.eq(asess::user_id)))
                .filter(asess::id_hash.eq(id_hash))
                .select((SessionRow::as_select(), UserRow::as_select()))
                .first(c)
                .optional()?;
            let Some((session, user)) = found else { return Ok(None) };
            if session.last_seen < idle_since || user.disabled {
                diesel::delete(asess::table.find(id_hash)).execute(c)?;
                return Ok(None);
            }
            diesel::update(asess::table.find(id_hash))
                .set(asess::last_seen.eq(super::now()))
                .execute(c)?;
            Ok(Some((session, user)))
        })
    }

    /// The second factor was verified: the session is complete.
    pub fn auth_session_complete(&self, id_hash: &[u8], amr: &str) -> Result<(), StoreError> {
        self.auth_exec(|c| {
            diesel::update(asess::table.find(id_hash))
                .set((asess::mfa_done.eq(true), asess::amr.eq(amr)))
                .execute(c)
        })
        .map(|_| ())
    }

    pub fn auth_session_end(&self, id_hash: &[u8]) -> Result<(), StoreError> {
        self.auth_exec(|c| diesel::delete(asess::table.find(id_hash)).execute(c))
            .map(|_| ())
    }

    pub fn auth_code_add(&self, code: &CodeRow) -> Result<(), StoreError> {
        self.auth_exec(|c| diesel::insert_into(acode::table).values(code).execute(c))
            .map(|_| ())
    }

    /// Takes an authorization code: it is deleted by the same transaction that returns it, so
    /// it is redeemed once. Expired codes are returned as `None` (and deleted).
    pub fn auth_code_take(&self, code_hash: &[u8]) -> Result<Option<CodeRow>, StoreError> {
        let now = super::now();
        self.write_tx(&Access::All, |c| {
            let row: Option<CodeRow> = acode::table
                .find(code_hash)
                .select(CodeRow::as_select())
                .first(c)
                .optional()?;
            let Some(row) = row else { return Ok(None) };
            if diesel::delete(acode::table.find(code_hash)).execute(c)? != 1 {
                return Ok(None);
            }
            diesel::delete(acode::table.filter(acode::expires_at.lt(now))).execute(c)?;
            Ok((row.expires_at >= now).then_some(row))
        })
    }

    pub fn auth_refresh_add(&self, row: &RefreshRow) -> Result<(), StoreError> {
        self.auth_exec(|c| diesel::insert_into(ar::table).values(row).execute(c))
            .map(|_| ())
    }

    /// Presents a refresh token: an active one within its lifetimes is spent and `next_hash`
    /// stored as the family's next token (idle lifetime from now, the family's absolute
    /// lifetime unchanged); a spent one revokes its family.
    pub fn auth_refresh_use(
        &self,
        token_hash: &[u8],
        next_hash: &[u8],
        idle_secs: i64,
    ) -> Result<RefreshUse, StoreError> {
        let now = super::now();
        self.write_tx(&Access::All, |c| {
            let row: Option<RefreshRow> = ar::table
                .find(token_hash)
                .select(RefreshRow::as_select())
                .first(c)
                .optional()?;
            let Some(row) = row else { return Ok(RefreshUse::Invalid) };
            if row.status == SPENT {
                diesel::update(ar::table.filter(ar::family_id.eq(&row.family_id)))
                    .set(ar::status.eq(REVOKED))
                    .execute(c)?;
                return Ok(RefreshUse::Replayed {
                    client_id: row.client_id,
                });
            }
            if row.status != ACTIVE || row.idle_expires_at < now || row.family_expires_at < now {
                return Ok(RefreshUse::Invalid);
            }
            let spent = diesel::update(ar::table.find(token_hash).filter(ar::status.eq(ACTIVE)))
                .set(ar::status.eq(SPENT))
                .execute(c)?;
            if spent != 1 {
                return Ok(RefreshUse::Invalid);
            }
            let next = RefreshRow {
                token_hash: next_hash.to_vec(),
                status: ACTIVE.into(),
                issued_at: now,
                idle_expires_at: (now + chrono::Duration::seconds(idle_secs)).min(row.family_expires_at),
                ..row
            };
            diesel::insert_into(ar::table).values(&next).execute(c)?;
            Ok(RefreshUse::Rotated(Box::new(next)))
        })
    }

    /// A refresh token's row, whatever its state (introspection, revocation).
    pub fn auth_refresh(&self, token_hash: &[u8]) -> Result<Option<RefreshRow>, StoreError> {
        self.auth_read(|c| {
            Ok(ar::table
                .find(token_hash)
                .select(RefreshRow::as_select())
                .first(c)
                .optional()?)
        })
    }

    /// Revokes the family of a refresh token (RFC 7009: revoking one revokes the grant).
    pub fn auth_refresh_revoke_family(&self, family_id: &str) -> Result<(), StoreError> {
        self.auth_exec(|c| {
            diesel::update(ar::table.filter(ar::family_id.eq(family_id)))
                .set(ar::status.eq(REVOKED))
                .execute(c)
        })
        .map(|_| ())
    }

    pub fn auth_launch_add(&self, launch: &LaunchRow) -> Result<(), StoreError> {
        self.auth_exec(|c| diesel::insert_into(al::table).values(launch).execute(c))
            .map(|_| ())
    }

    /// Takes a launch value (once): its context, if it exists and has not expired.
    pub fn auth_launch_take(&self, launch_hash: &[u8]) -> Result<Option<LaunchRow>, StoreError> {
        let now = super::now();
        self.write_tx(&Access::All, |c| {
            let row: Option<LaunchRow> = al::table
                .find(launch_hash)
                .select(LaunchRow::as_select())
                .first(c)
                .optional()?;
            diesel::delete(al::table.filter(al::launch_hash.eq(launch_hash).or(al::expires_at.lt(now)))).execute(c)?;
            Ok(row.filter(|r| r.expires_at >= now))
        })
    }

    /// Records a client assertion's `jti`: false if the client used it before (a replay).
    pub fn auth_assertion_first_use(
        &self,
        client_id: &str,
        jti: &str,
        expires_at: NaiveDateTime,
    ) -> Result<bool, StoreError> {
        let now = super::now();
        let result = self.write_tx(&Access::All, |c| {
            diesel::delete(aa::table.filter(aa::client_id.eq(client_id).and(aa::expires_at.lt(now)))).execute(c)?;
            diesel::insert_into(aa::table)
                .values((
                    aa::client_id.eq(client_id),
                    aa::jti.eq(jti),
                    aa::expires_at.eq(expires_at),
                ))
                .execute(c)?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.is_unique_violation() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Records an access token revoked before its expiry.
    pub fn auth_revoke_access_token(&self, jti: &str, expires_at: NaiveDateTime) -> Result<(), StoreError> {
        let now = super::now();
        let result = self.write_tx(&Access::All, |c| {
            diesel::delete(arv::table.filter(arv::expires_at.lt(now))).execute(c)?;
            diesel::insert_into(arv::table)
                .values((
                    arv::jti.eq(jti),
                    arv::revoked_at.eq(now),
                    arv::expires_at.eq(expires_at),
                ))
                .execute(c)?;
            Ok(())
        });
        match result {
            Err(e) if e.is_unique_violation() => Ok(()),
            other => other,
        }
    }

    /// The access tokens revoked and not yet expired (every node reloads them periodically).
    pub fn auth_revoked_access_tokens(&self) -> Result<Vec<(String, NaiveDateTime)>, StoreError> {
        let now = super::now();
        self.auth_read(|c| {
            Ok(arv::table
                .filter(arv::expires_at.ge(now))
                .select((arv::jti, arv::expires_at))
                .load(c)?)
        })
    }
}

/// Ends a user's browser sessions and revokes their refresh tokens.
fn end_user_grants(c: &mut super::DbConnection, user_id: &str) -> Result<(), StoreError> {
    diesel::delete(asess::table.filter(asess::user_id.eq(user_id))).execute(c)?;
    diesel::update(ar::table.filter(ar::user_id.eq(user_id)))
        .set(ar::status.eq(REVOKED))
        .execute(c)?;
    Ok(())
}
