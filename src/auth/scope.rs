//! The SMART App Launch scope grammar, v2 and v1.
//!
//! v2: `(patient|user|system)/(Type|*).(c?r?u?d?s?)[?param=value&…]`, the letters in that order,
//! at least one, none twice. v1: `.read` (= `rs`), `.write` (= `cud`), `.*` (= `cruds`).
//! Also `launch`, `launch/patient`, `openid`, `fhirUser`, `profile`, `offline_access`,
//! `online_access`. Parsing is strict: anything else, including a resource type that R4 does not
//! define, is ignored (recorded in `ignored`), never widened into something it does not say.

/// Whose data a resource scope speaks of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Context {
    Patient,
    User,
    System,
}

/// The SMART v2 permission letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions {
    pub create: bool,
    pub read: bool,
    pub update: bool,
    pub delete: bool,
    pub search: bool,
}

impl Permissions {
    fn parse_v2(letters: &str) -> Option<Permissions> {
        let mut p = Permissions::default();
        let mut last = 0usize;
        if letters.is_empty() {
            return None;
        }
        for ch in letters.chars() {
            let pos = "cruds".find(ch)? + 1;
            if pos <= last {
                return None; // out of order or repeated
            }
            last = pos;
            match ch {
                'c' => p.create = true,
                'r' => p.read = true,
                'u' => p.update = true,
                'd' => p.delete = true,
                's' => p.search = true,
                _ => return None,
            }
        }
        Some(p)
    }

    fn parse_v1(word: &str) -> Option<Permissions> {
        let all = Permissions {
            create: true,
            read: true,
            update: true,
            delete: true,
            search: true,
        };
        match word {
            "read" => Some(Permissions {
                read: true,
                search: true,
                ..Default::default()
            }),
            "write" => Some(Permissions {
                create: true,
                update: true,
                delete: true,
                ..Default::default()
            }),
            "*" => Some(all),
            _ => None,
        }
    }

    pub fn allows(&self, needed: Permission) -> bool {
        match needed {
            Permission::Create => self.create,
            Permission::Read => self.read,
            Permission::Update => self.update,
            Permission::Delete => self.delete,
            Permission::Search => self.search,
        }
    }
}

/// One permission an interaction needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

/// One resource scope, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    pub context: Context,
    /// `None` for `*`.
    pub resource_type: Option<String>,
    pub permissions: Permissions,
    /// Granular constraints (`?category=…|laboratory`), as written.
    pub constraints: Vec<(String, String)>,
    /// The constraints compiled against the search parameters of the type
    /// ([`ScopeSet::compile_filters`]). A scope with constraints but no filter (not compiled, a
    /// `*` type, or a condition the server cannot evaluate) grants nothing: it only narrows.
    pub filter: Option<std::sync::Arc<crate::search::granular::ScopeFilter>>,
}

impl ResourceScope {
    /// Whether this scope grants `needed` on `resource_type` (a granular scope: on the
    /// resources its filter admits, see `policy::Decision`).
    pub fn grants(&self, resource_type: &str, needed: Permission) -> bool {
        (self.constraints.is_empty() || self.filter.is_some())
            && self.resource_type.as_deref().is_none_or(|t| t == resource_type)
            && self.permissions.allows(needed)
    }
}

/// Every scope of a token, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    pub resources: Vec<ResourceScope>,
    pub launch: bool,
    pub launch_patient: bool,
    pub openid: bool,
    pub fhir_user: bool,
    pub profile: bool,
    pub offline_access: bool,
    pub online_access: bool,
    /// Scopes not understood; they grant nothing.
    pub ignored: Vec<String>,
    /// Every scope as written (for policy rules that name a scope exactly).
    pub raw: Vec<String>,
}

impl ScopeSet {
    /// Parses a space-separated scope string. `is_type` says which resource types exist.
    pub fn parse(scopes: &str, is_type: impl Fn(&str) -> bool) -> ScopeSet {
        let mut set = ScopeSet::default();
        for token in scopes.split(' ').filter(|s| !s.is_empty()) {
            set.raw.push(token.chars().take(200).collect());
            match token {
                "launch" => set.launch = true,
                "launch/patient" => set.launch_patient = true,
                "openid" => set.openid = true,
                "fhirUser" => set.fhir_user = true,
                "profile" => set.profile = true,
                "offline_access" => set.offline_access = true,
                "online_access" => set.online_access = true,
                _ => match parse_resource_scope(token, &is_type) {
                    Some(s) => set.resources.push(s),
                    None => set.ignored.push(token.chars().take(100).collect()),
                },
            }
        }
        set
    }

    /// Compiles the granular scopes' constraints (SMART v2 `?param=value`) against the search
    /// parameters of their type; those that do not compile keep granting nothing.
    pub fn compile_filters(&mut self, registry: &crate::search::Registry) {
        for s in &mut self.resources {
            if let (Some(t), false) = (&s.resource_type, s.constraints.is_empty()) {
                s.filter =
                    crate::search::granular::ScopeFilter::compile(registry, t, &s.constraints).map(std::sync::Arc::new);
            }
        }
    }

    /// Whether any scope is granular (carries constraints).
    pub fn any_granular(&self) -> bool {
        self.resources.iter().any(|s| !s.constraints.is_empty())
    }

    /// Whether any scope of `context` grants `needed` on `resource_type`.
    pub fn grants(&self, context: Context, resource_type: &str, needed: Permission) -> bool {
        self.resources
            .iter()
            .any(|s| s.context == context && s.grants(resource_type, needed))
    }

    /// The contexts in which some scope grants `needed` on `resource_type`.
    pub fn contexts_granting(&self, resource_type: &str, needed: Permission) -> Vec<Context> {
        let mut out: Vec<Context> = self
            .resources
            .iter()
            .filter(|s| s.grants(resource_type, needed))
            .map(|s| s.context)
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn parse_resource_scope(token: &str, is_type: &impl Fn(&str) -> bool) -> Option<ResourceScope> {
    let (context, rest) = token.split_once('/')?;
    let context = match context {
        "patient" => Context::Patient,
        "user" => Context::User,
        "system" => Context::System,
        _ => return None,
    };
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (resource, perms) = main.split_once('.')?;
    let resource_type = match resource {
        "*" => None,
        t if is_type(t) => Some(t.to_string()),
        _ => return None,
    };
    let permissions = Permissions::parse_v1(perms).or_else(|| Permissions::parse_v2(perms))?;
    let constraints = match query {
        None => Vec::new(),
        Some(q) => {
            let pairs: Option<Vec<(String, String)>> = q
                .split('&')
                .map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (!k.is_empty() && !v.is_empty()).then(|| (k.to_string(), v.to_string()))
                })
                .collect();
            let pairs = pairs?;
            if pairs.is_empty() {
                return None;
            }
            pairs
        }
    };
    Some(ResourceScope {
        context,
        resource_type,
        permissions,
        constraints,
        filter: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ScopeSet {
        ScopeSet::parse(s, |t| matches!(t, "Patient" | "Observation"))
    }

    #[test]
    fn v2_scopes() {
        let s = parse("patient/Observation.rs user/*.cruds system/Patient.r");
        assert!(s.grants(Context::Patient, "Observation", Permission::Read));
        assert!(s.grants(Context::Patient, "Observation", Permission::Search));
        assert!(!s.grants(Context::Patient, "Observation", Permission::Create));
        assert!(!s.grants(Context::Patient, "Patient", Permission::Read));
        assert!(s.grants(Context::User, "Patient", Permission::Delete));
        assert!(s.grants(Context::System, "Patient", Permission::Read));
        assert!(!s.grants(Context::System, "Patient", Permission::Search));
        assert!(s.ignored.is_empty());
    }

    #[test]
    fn v1_scopes() {
        let s = parse("patient/*.read user/Observation.write system/Patient.*");
        assert!(s.grants(Context::Patient, "Patient", Permission::Read));
        assert!(s.grants(Context::Patient, "Observation", Permission::Search));
        assert!(!s.grants(Context::Patient, "Observation", Permission::Update));
        assert!(s.grants(Context::User, "Observation", Permission::Update));
        assert!(!s.grants(Context::User, "Observation", Permission::Read));
        assert!(s.grants(Context::System, "Patient", Permission::Delete));
    }

    #[test]
    fn strict_parsing_never_widens() {
        let s = parse(
            "patient/Observation.sr patient/Observation.rr patient/Observation. patient/Unknown.r \
             admin/*.r patient/*.x patient/Observation patient/Observation.rs? PATIENT/*.r",
        );
        assert!(s.resources.is_empty(), "{:?}", s.resources);
        assert_eq!(s.ignored.len(), 9);
    }

    #[test]
    fn granular_scopes_grant_only_once_compiled() {
        let s = parse(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        );
        assert_eq!(s.resources.len(), 1);
        assert_eq!(s.resources[0].constraints[0].0, "category");
        assert!(!s.grants(Context::Patient, "Observation", Permission::Read));
        // compiled against the search parameters, it grants (what its filter admits: policy)
        let registry = crate::search::Registry::r4().unwrap();
        let mut compiled = s.clone();
        compiled.compile_filters(&registry);
        assert!(compiled.grants(Context::Patient, "Observation", Permission::Read));
        assert!(!compiled.grants(Context::Patient, "Observation", Permission::Create));
        // a condition the server cannot evaluate keeps granting nothing
        let mut odd = parse("patient/Observation.rs?date=2020 patient/*.rs?category=laboratory");
        odd.compile_filters(&registry);
        assert!(!odd.grants(Context::Patient, "Observation", Permission::Read));
    }

    #[test]
    fn launch_and_identity_scopes() {
        let s = parse("launch/patient openid fhirUser offline_access launch profile online_access");
        assert!(
            s.launch_patient && s.openid && s.fhir_user && s.offline_access && s.launch && s.profile && s.online_access
        );
        assert!(s.resources.is_empty());
    }
}
