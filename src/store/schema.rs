//! Diesel table definitions, shared by both backends.

diesel::table! {
    use diesel::sql_types::*;
    use crate::store::encrypted::Encrypted;

    resource_versions (id) {
        id -> BigInt,
        resource_type -> Text,
        logical_id -> Text,
        version_id -> BigInt,
        last_updated -> Timestamp,
        deleted -> Bool,
        method -> Text,
        key_version -> Nullable<Integer>,
        content -> Nullable<Encrypted>,
        content_sha256 -> Nullable<Binary>,
    }
}

diesel::table! {
    resources (resource_type, logical_id) {
        resource_type -> Text,
        logical_id -> Text,
        version_id -> BigInt,
        last_updated -> Timestamp,
        deleted -> Bool,
    }
}

diesel::table! {
    resource_compartments (resource_type, logical_id, version_id, patient_id) {
        resource_type -> Text,
        logical_id -> Text,
        version_id -> BigInt,
        patient_id -> Text,
    }
}

diesel::allow_tables_to_appear_in_same_query!(resource_versions, resources, resource_compartments);

diesel::table! {
    use diesel::sql_types::*;
    use crate::store::encrypted::Encrypted;

    audit_events (id) {
        id -> Text,
        recorded -> Timestamp,
        key_version -> Integer,
        content -> Encrypted,
        chain_id -> BigInt,
    }
}

diesel::table! {
    audit_search (event_id) {
        event_id -> Text,
        recorded -> Timestamp,
        type_code -> Text,
        subtype -> Text,
        action -> Text,
        outcome -> Text,
        agent -> Text,
        site -> Text,
        address -> Nullable<Binary>,
    }
}

diesel::table! {
    audit_entities (event_id, role, reference) {
        event_id -> Text,
        role -> Text,
        reference -> Text,
    }
}

diesel::table! {
    audit_chains (id) {
        id -> BigInt,
        node -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    audit_chain (chain_id, seq) {
        seq -> BigInt,
        event_id -> Text,
        prev_hash -> Binary,
        hash -> Binary,
        chain_id -> BigInt,
    }
}

diesel::table! {
    audit_checkpoints (id) {
        id -> Text,
        format -> Integer,
        signed_at -> Timestamp,
        key_id -> Text,
        heads -> Text,
        signature -> Binary,
    }
}

diesel::table! {
    audit_archives (chain_id, up_to_seq) {
        up_to_seq -> BigInt,
        last_hash -> Binary,
        archived_at -> Timestamp,
        cutoff -> Timestamp,
        events -> BigInt,
        file_sha256 -> Binary,
        chain_id -> BigInt,
    }
}

diesel::table! {
    audit_index_progress (chain_id) {
        chain_id -> BigInt,
        indexed_seq -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    audit_events,
    audit_search,
    audit_entities,
    audit_chains,
    audit_chain,
    audit_checkpoints,
    audit_archives,
    audit_index_progress
);

diesel::table! {
    export_jobs (id) {
        id -> Text,
        owner -> Text,
        status -> Text,
        request -> Binary,
        transaction_time -> Timestamp,
        created_at -> Timestamp,
        lease_until -> Nullable<Timestamp>,
        expires_at -> Nullable<Timestamp>,
        resources_done -> BigInt,
        error -> Nullable<Text>,
    }
}

diesel::table! {
    export_files (job_id, seq) {
        job_id -> Text,
        seq -> Integer,
        resource_type -> Text,
        resource_count -> BigInt,
        last_id -> Text,
    }
}

diesel::table! {
    auth_users (id) {
        id -> Text,
        username -> Text,
        password_hash -> Text,
        fhir_user -> Nullable<Text>,
        roles -> Text,
        totp_secret -> Nullable<Binary>,
        totp_last_step -> BigInt,
        disabled -> Bool,
        failed_logins -> Integer,
        locked_until -> Nullable<Timestamp>,
        created_at -> Timestamp,
        last_sign_in_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    auth_clients (client_id) {
        client_id -> Text,
        name -> Text,
        client_type -> Text,
        secret_hash -> Nullable<Text>,
        jwks -> Nullable<Text>,
        jwks_uri -> Nullable<Text>,
        redirect_uris -> Text,
        scopes -> Text,
        disabled -> Bool,
        created_at -> Timestamp,
        last_token_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    auth_sessions (id_hash) {
        id_hash -> Binary,
        user_id -> Text,
        mfa_done -> Bool,
        amr -> Text,
        created_at -> Timestamp,
        last_seen -> Timestamp,
    }
}

diesel::table! {
    auth_codes (code_hash) {
        code_hash -> Binary,
        client_id -> Text,
        user_id -> Text,
        redirect_uri -> Text,
        scope -> Text,
        patient -> Nullable<Text>,
        encounter -> Nullable<Text>,
        code_challenge -> Text,
        nonce -> Nullable<Text>,
        amr -> Text,
        auth_time -> Timestamp,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    auth_refresh_tokens (token_hash) {
        token_hash -> Binary,
        family_id -> Text,
        client_id -> Text,
        user_id -> Nullable<Text>,
        scope -> Text,
        patient -> Nullable<Text>,
        encounter -> Nullable<Text>,
        amr -> Text,
        status -> Text,
        issued_at -> Timestamp,
        idle_expires_at -> Timestamp,
        family_expires_at -> Timestamp,
    }
}

diesel::table! {
    auth_launches (launch_hash) {
        launch_hash -> Binary,
        patient -> Nullable<Text>,
        encounter -> Nullable<Text>,
        client_id -> Nullable<Text>,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    auth_assertions (client_id, jti) {
        client_id -> Text,
        jti -> Text,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    auth_revoked_tokens (jti) {
        jti -> Text,
        revoked_at -> Timestamp,
        expires_at -> Timestamp,
    }
}

diesel::allow_tables_to_appear_in_same_query!(auth_users, auth_sessions);

diesel::table! {
    subscription_state (subscription_id) {
        subscription_id -> Text,
        owner -> Text,
        status -> Text,
        events_since_start -> BigInt,
        failures -> Integer,
        next_attempt_at -> Nullable<Timestamp>,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<Timestamp>,
        last_sent_at -> Nullable<Timestamp>,
        last_error -> Nullable<Text>,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    subscription_outbox (id) {
        id -> BigInt,
        subscription_id -> Text,
        resource_type -> Text,
        logical_id -> Text,
        version_id -> BigInt,
        event -> Text,
        recorded -> Timestamp,
        event_number -> Nullable<BigInt>,
        sent_at -> Nullable<Timestamp>,
        dropped -> Bool,
    }
}

diesel::allow_tables_to_appear_in_same_query!(subscription_state, subscription_outbox);

diesel::table! {
    break_glass_uses (token_id) {
        token_id -> Text,
        issued_at -> Timestamp,
        expires_at -> Timestamp,
        subject -> Text,
        fhir_user -> Text,
        client_id -> Nullable<Text>,
        reason -> Binary,
        reviewed_at -> Nullable<Timestamp>,
        reviewed_by -> Nullable<Text>,
    }
}
