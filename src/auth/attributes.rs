//! Attribute-level access: a policy file maps scopes, roles and security labels to element
//! rules per resource type.
//!
//! ```toml
//! # Hide elements from everyone without an exempting scope or role; the response then carries
//! # the SUBSETTED tag. Hidden elements are kept as they are on update (a client cannot erase
//! # what it cannot see).
//! [[element_rule]]
//! resource = "Patient"
//! hide = ["telecom", "identifier[system=http://hl7.org/fhir/sid/us-ssn]"]
//! exempt_roles = ["registrar"]
//! exempt_scopes = ["system/Patient.cruds"]
//!
//! # Elements only exempt tokens may set or change (403 otherwise).
//! [[element_rule]]
//! resource = "Patient"
//! read_only = ["birthDate"]
//!
//! # Resources labelled so in meta.security are visible only with one of these roles/scopes;
//! # to everyone else they are absent (404), and they cannot be created or changed (403).
//! [[label_rule]]
//! system = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
//! code = "HIV"
//! require_roles = ["hiv-care"]
//! ```
//!
//! A path is dotted element names; a segment may filter the items of a repeating element with
//! `[child=value]` (string equality on a direct child).

use super::{AuthError, Principal};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    element_rule: Vec<ElementRuleSpec>,
    #[serde(default)]
    label_rule: Vec<LabelRuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ElementRuleSpec {
    resource: String,
    #[serde(default)]
    hide: Vec<String>,
    #[serde(default)]
    read_only: Vec<String>,
    #[serde(default)]
    exempt_roles: Vec<String>,
    #[serde(default)]
    exempt_scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelRuleSpec {
    system: String,
    code: String,
    #[serde(default)]
    require_roles: Vec<String>,
    #[serde(default)]
    require_scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    name: String,
    filter: Option<(String, String)>,
}

#[derive(Debug, Clone)]
struct ElementRule {
    hide: Vec<Vec<Segment>>,
    read_only: Vec<Vec<Segment>>,
    exempt_roles: Vec<String>,
    exempt_scopes: Vec<String>,
}

#[derive(Debug, Clone)]
struct LabelRule {
    system: String,
    code: String,
    require_roles: Vec<String>,
    require_scopes: Vec<String>,
}

/// The compiled policy (loaded once at start-up).
#[derive(Debug, Clone, Default)]
pub struct AttributePolicy {
    by_type: HashMap<String, Vec<ElementRule>>,
    labels: Vec<LabelRule>,
}

const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

fn parse_path(text: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (seg, tail) = match (rest.find('.'), rest.find('[')) {
            (_, Some(b))
                if rest[..b].chars().all(|c| c.is_ascii_alphanumeric()) && rest.find('.').is_none_or(|d| b < d) =>
            {
                let close = rest[b..].find(']').ok_or_else(|| format!("unclosed [ in {text}"))? + b;
                let (k, v) = rest[b + 1..close]
                    .split_once('=')
                    .ok_or_else(|| format!("expected [child=value] in {text}"))?;
                let seg = Segment {
                    name: rest[..b].to_string(),
                    filter: Some((k.trim().to_string(), v.trim().to_string())),
                };
                let tail = rest[close + 1..].strip_prefix('.').unwrap_or(&rest[close + 1..]);
                (seg, tail)
            }
            (Some(d), _) => (
                Segment {
                    name: rest[..d].to_string(),
                    filter: None,
                },
                &rest[d + 1..],
            ),
            (None, _) => (
                Segment {
                    name: rest.to_string(),
                    filter: None,
                },
                "",
            ),
        };
        if seg.name.is_empty() || !seg.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad element path {text}"));
        }
        out.push(seg);
        rest = tail;
    }
    if out.is_empty() {
        return Err("empty element path".into());
    }
    Ok(out)
}

impl AttributePolicy {
    /// Loads and checks a policy file; errors name the file and the problem.
    pub fn load(path: &Path, is_type: impl Fn(&str) -> bool) -> Result<AttributePolicy, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml(&text, is_type).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str, is_type: impl Fn(&str) -> bool) -> Result<AttributePolicy, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let mut by_type: HashMap<String, Vec<ElementRule>> = HashMap::new();
        for r in file.element_rule {
            if !is_type(&r.resource) {
                return Err(format!("unknown resource type {}", r.resource));
            }
            let hide = r.hide.iter().map(|p| parse_path(p)).collect::<Result<Vec<_>, _>>()?;
            let read_only = r
                .read_only
                .iter()
                .map(|p| parse_path(p))
                .collect::<Result<Vec<_>, _>>()?;
            by_type.entry(r.resource).or_default().push(ElementRule {
                hide,
                read_only,
                exempt_roles: r.exempt_roles,
                exempt_scopes: r.exempt_scopes,
            });
        }
        let labels = file
            .label_rule
            .into_iter()
            .map(|l| LabelRule {
                system: l.system,
                code: l.code,
                require_roles: l.require_roles,
                require_scopes: l.require_scopes,
            })
            .collect();
        Ok(AttributePolicy { by_type, labels })
    }

    /// Whether anything in the policy can concern this resource type.
    pub fn concerns(&self, resource_type: &str) -> bool {
        !self.labels.is_empty() || self.by_type.contains_key(resource_type)
    }

    fn rules_for<'a>(&'a self, p: &'a Principal, resource_type: &str) -> impl Iterator<Item = &'a ElementRule> + 'a {
        self.by_type
            .get(resource_type)
            .into_iter()
            .flatten()
            .filter(move |r| !exempt(p, &r.exempt_roles, &r.exempt_scopes))
    }

    /// Whether the principal may see a resource with these security labels.
    pub fn labels_allow(&self, p: &Principal, resource: &Value) -> bool {
        let labels: Vec<(&str, &str)> = resource
            .pointer("/meta/security")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c.get("system")?.as_str()?, c.get("code")?.as_str()?)))
            .collect();
        self.labels.iter().all(|rule| {
            !labels.iter().any(|(s, c)| *s == rule.system && *c == rule.code)
                || exempt(p, &rule.require_roles, &rule.require_scopes)
        })
    }

    /// Removes the elements hidden from this principal; tags the resource SUBSETTED if any was.
    pub fn mask(&self, p: &Principal, resource_type: &str, resource: &mut Value) -> bool {
        let mut removed = false;
        for rule in self.rules_for(p, resource_type) {
            for path in &rule.hide {
                removed |= remove_path(resource, path);
            }
        }
        if removed {
            let meta = resource
                .as_object_mut()
                .map(|o| o.entry("meta").or_insert_with(|| Value::Object(Map::new())));
            if let Some(Value::Object(meta)) = meta {
                let tags = meta.entry("tag").or_insert_with(|| Value::Array(vec![]));
                if let Value::Array(tags) = tags {
                    tags.push(json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}));
                }
            }
        }
        removed
    }

    /// Checks and completes a write: read-only elements must not change (nor be set on create),
    /// labels must be the principal's to use, and hidden elements keep their stored values.
    pub fn check_write(
        &self,
        p: &Principal,
        resource_type: &str,
        old: Option<&Value>,
        new: &mut Value,
    ) -> Result<(), AuthError> {
        if !self.labels_allow(p, new) || old.is_some_and(|o| !self.labels_allow(p, o)) {
            return Err(AuthError::InsufficientScope);
        }
        for rule in self.rules_for(p, resource_type) {
            for path in &rule.read_only {
                let before = old.map(|o| values_at(o, path)).unwrap_or_default();
                if values_at(new, path) != before {
                    return Err(AuthError::InsufficientScope);
                }
            }
            for path in &rule.hide {
                remove_path(new, path);
                if let Some(o) = old {
                    restore_path(o, new, path);
                }
            }
        }
        Ok(())
    }

    /// Whether some label rule binds this principal (then listings cannot show true totals).
    pub fn label_rules_bind(&self, p: &Principal) -> bool {
        self.labels
            .iter()
            .any(|l| !exempt(p, &l.require_roles, &l.require_scopes))
    }

    /// Applies the policy to stored JSON about to be returned: `None` when its labels hide it
    /// from the principal, else the (possibly masked) JSON.
    pub fn shape_stored(&self, p: &Principal, resource_type: &str, json: Vec<u8>) -> Option<Vec<u8>> {
        if !self.concerns(resource_type) {
            return Some(json);
        }
        let Ok(mut value) = serde_json::from_slice::<Value>(&json) else {
            return None;
        };
        if !self.labels_allow(p, &value) {
            return None;
        }
        if self.mask(p, resource_type, &mut value) {
            serde_json::to_vec(&value).ok()
        } else {
            Some(json)
        }
    }

    /// Whether a write by this principal needs the stored content (to compare or restore).
    pub fn needs_old_content(&self, p: &Principal, resource_type: &str) -> bool {
        self.label_rules_bind(p) || self.rules_for(p, resource_type).next().is_some()
    }
}

fn exempt(p: &Principal, roles: &[String], scopes: &[String]) -> bool {
    p.roles.iter().any(|r| roles.contains(r)) || p.scopes.raw.iter().any(|s| scopes.contains(s))
}

fn matches_filter(item: &Value, filter: &Option<(String, String)>) -> bool {
    match filter {
        None => true,
        Some((k, v)) => item.get(k).and_then(Value::as_str) == Some(v.as_str()),
    }
}

/// Removes what `path` names; returns whether anything was removed.
fn remove_path(node: &mut Value, path: &[Segment]) -> bool {
    let Some((seg, rest)) = path.split_first() else {
        return false;
    };
    let Some(obj) = node.as_object_mut() else { return false };
    let Some(child) = obj.get_mut(&seg.name) else {
        return false;
    };
    if rest.is_empty() {
        match child {
            Value::Array(items) if seg.filter.is_some() => {
                let before = items.len();
                items.retain(|i| !matches_filter(i, &seg.filter));
                let removed = items.len() != before;
                if items.is_empty() {
                    obj.remove(&seg.name);
                }
                removed
            }
            _ => {
                obj.remove(&seg.name);
                // the primitive's extension sibling (`_name`) goes too
                obj.remove(&format!("_{}", seg.name));
                true
            }
        }
    } else {
        let mut removed = false;
        match child {
            Value::Array(items) => {
                for i in items.iter_mut().filter(|i| matches_filter(i, &seg.filter)) {
                    removed |= remove_path(i, rest);
                }
            }
            other if matches_filter(other, &seg.filter) => removed |= remove_path(other, rest),
            _ => {}
        }
        removed
    }
}

/// The values `path` names, in order (for read-only comparison).
fn values_at(node: &Value, path: &[Segment]) -> Vec<Value> {
    let Some((seg, rest)) = path.split_first() else {
        return vec![node.clone()];
    };
    let items: Vec<&Value> = match node.get(&seg.name) {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v) => vec![v],
        None => vec![],
    };
    items
        .into_iter()
        .filter(|i| matches_filter(i, &seg.filter))
        .flat_map(|i| values_at(i, rest))
        .collect()
}

/// Copies top-level hidden content from `old` into `new` (nested paths restore their first
/// segment's matching items), so a client that cannot see an element cannot erase it.
fn restore_path(old: &Value, new: &mut Value, path: &[Segment]) {
    let Some(seg) = path.first() else { return };
    let (Some(o), Some(n)) = (old.as_object(), new.as_object_mut()) else {
        return;
    };
    if path.len() > 1 {
        // Nested hidden elements: keep the stored parent items as they were.
        if let Some(v) = o.get(&seg.name) {
            n.insert(seg.name.clone(), v.clone());
        }
        return;
    }
    match (o.get(&seg.name), &seg.filter) {
        (Some(Value::Array(items)), Some(_)) => {
            let kept: Vec<Value> = items
                .iter()
                .filter(|i| matches_filter(i, &seg.filter))
                .cloned()
                .collect();
            if !kept.is_empty() {
                let slot = n.entry(seg.name.clone()).or_insert_with(|| Value::Array(vec![]));
                if let Value::Array(a) = slot {
                    a.extend(kept);
                }
            }
        }
        (Some(v), _) => {
            n.insert(seg.name.clone(), v.clone());
            if let Some(ext) = o.get(&format!("_{}", seg.name)) {
                n.insert(format!("_{}", seg.name), ext.clone());
            }
        }
        (None, _) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{PrincipalKind, ScopeSet};

    fn principal(roles: &[&str]) -> Principal {
        Principal {
            subject: "s".into(),
            kind: PrincipalKind::User,
            scopes: ScopeSet::parse("user/*.cruds", |_| true),
            patient: None,
            fhir_user: Some("Practitioner/1".into()),
            client_id: None,
            amr: vec![],
            roles: roles.iter().map(|r| r.to_string()).collect(),
            break_glass: false,
            purpose_of_use: None,
            token_id: "j".into(),
            expires_at: i64::MAX,
        }
    }

    const POLICY: &str = r#"
[[element_rule]]
resource = "Patient"
hide = ["telecom", "identifier[system=urn:ssn]"]
exempt_roles = ["registrar"]
[[element_rule]]
resource = "Patient"
read_only = ["birthDate"]
exempt_roles = ["registrar"]
[[label_rule]]
system = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
code = "HIV"
require_roles = ["hiv-care"]
"#;

    fn policy() -> AttributePolicy {
        AttributePolicy::from_toml(POLICY, |t| t == "Patient").unwrap()
    }

    #[test]
    fn hides_elements_and_tags_subsetted() {
        let mut p = json!({"resourceType":"Patient","telecom":[{"value":"555"}],
            "identifier":[{"system":"urn:ssn","value":"123"},{"system":"urn:mrn","value":"9"}]});
        assert!(policy().mask(&principal(&[]), "Patient", &mut p));
        assert!(p.get("telecom").is_none());
        assert_eq!(p["identifier"], json!([{"system":"urn:mrn","value":"9"}]));
        assert_eq!(p["meta"]["tag"][0]["code"], "SUBSETTED");
        let mut q = json!({"resourceType":"Patient","telecom":[{"value":"555"}]});
        assert!(!policy().mask(&principal(&["registrar"]), "Patient", &mut q));
        assert!(q.get("telecom").is_some());
    }

    #[test]
    fn read_only_and_hidden_on_write() {
        let old = json!({"resourceType":"Patient","birthDate":"1970-01-01","telecom":[{"value":"555"}],
                         "identifier":[{"system":"urn:ssn","value":"123"}]});
        let mut changed = json!({"resourceType":"Patient","birthDate":"1971-01-01"});
        assert!(policy()
            .check_write(&principal(&[]), "Patient", Some(&old), &mut changed)
            .is_err());
        let mut same = json!({"resourceType":"Patient","birthDate":"1970-01-01","active":true,
                              "telecom":[{"value":"attacker"}]});
        policy()
            .check_write(&principal(&[]), "Patient", Some(&old), &mut same)
            .unwrap();
        assert_eq!(
            same["telecom"],
            json!([{"value":"555"}]),
            "hidden elements keep their stored value"
        );
        assert_eq!(same["identifier"], json!([{"system":"urn:ssn","value":"123"}]));
        let mut create = json!({"resourceType":"Patient","birthDate":"1970-01-01"});
        assert!(policy()
            .check_write(&principal(&[]), "Patient", None, &mut create)
            .is_err());
        assert!(policy()
            .check_write(&principal(&["registrar"]), "Patient", None, &mut create)
            .is_ok());
    }

    #[test]
    fn labels_require_roles() {
        let labelled =
            json!({"meta":{"security":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"HIV"}]}});
        assert!(!policy().labels_allow(&principal(&[]), &labelled));
        assert!(policy().labels_allow(&principal(&["hiv-care"]), &labelled));
        assert!(policy().labels_allow(&principal(&[]), &json!({})));
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(AttributePolicy::from_toml("[[element_rule]]\nresource = \"Nope\"\n", |t| t == "Patient").is_err());
        assert!(
            AttributePolicy::from_toml("[[element_rule]]\nresource = \"Patient\"\nhide = [\"a[b\"]\n", |t| t
                == "Patient")
            .is_err()
        );
        assert!(AttributePolicy::from_toml("[[elemnt_rule]]\n", |_| true).is_err());
    }
}
