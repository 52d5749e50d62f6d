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
    token_index (resource_type, logical_id, param, value) {
        resource_type -> Text,
        logical_id -> Text,
        param -> Text,
        value -> Binary,
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

diesel::allow_tables_to_appear_in_same_query!(resource_versions, resources, token_index, resource_compartments);
