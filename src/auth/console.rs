//! Who may use the compliance console (`/console`) and for what. A user signs in through the
//! built-in authorization server; their account's roles decide: `auditor` reads the audit log,
//! patients' access reports, break-glass uses (and marks them reviewed) and the compliance
//! report; `admin` does all of that and manages accounts (disable, enable, reset the second
//! factor, disable clients). Any other user is refused every page.

/// The client id the console's sign-ins carry (in the sealed request and in their audit events).
/// Reserved: no registered client may take it.
pub const CONSOLE_CLIENT_ID: &str = "fhirvault-console";
/// Where a console sign-in lands.
pub const CONSOLE_HOME: &str = "/console";

/// The console's sign-in, carried sealed through the authorization server's pages like an
/// app's authorize request: it names the console, which is never issued a code or a token —
/// the signed-in session (with its second factor, as configured) is what the console trusts.
pub fn sign_in_request(now: i64) -> super::server::AuthzRequest {
    super::server::AuthzRequest {
        client_id: CONSOLE_CLIENT_ID.into(),
        client_name: "the fhirvault console".into(),
        redirect_uri: CONSOLE_HOME.into(),
        scope: "openid fhirUser".into(),
        state: None,
        code_challenge: String::new(),
        nonce: None,
        launch_patient: None,
        launch_encounter: None,
        expires: now + super::server::REQUEST_SECS,
    }
}

/// Whether a sealed sign-in is the console's (its pages then lead back to `/console`).
pub fn is_console(request: &super::server::AuthzRequest) -> bool {
    request.client_id == CONSOLE_CLIENT_ID
}

/// A console user's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConsoleRole {
    Auditor,
    Admin,
}

/// What a console page or action needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleAction {
    /// The audit log, access reports, break-glass uses, the compliance report.
    Review,
    /// Marking a break-glass use reviewed.
    ReviewBreakGlass,
    /// Listing, disabling and enabling accounts, resetting second factors.
    ManageAccounts,
}

impl ConsoleRole {
    /// The standing an account's roles (space-separated, as stored) give; `None`: no console.
    pub fn of(roles: &str) -> Option<ConsoleRole> {
        let roles: Vec<&str> = roles.split_whitespace().collect();
        if roles.contains(&"admin") {
            Some(ConsoleRole::Admin)
        } else if roles.contains(&"auditor") {
            Some(ConsoleRole::Auditor)
        } else {
            None
        }
    }

    pub fn may(self, action: ConsoleAction) -> bool {
        match action {
            ConsoleAction::Review | ConsoleAction::ReviewBreakGlass => true,
            ConsoleAction::ManageAccounts => self == ConsoleRole::Admin,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ConsoleRole::Auditor => "auditor",
            ConsoleRole::Admin => "admin",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_decide_the_console() {
        assert_eq!(ConsoleRole::of("nurse"), None);
        assert_eq!(ConsoleRole::of(""), None);
        assert_eq!(ConsoleRole::of("administrator"), None);
        assert_eq!(ConsoleRole::of("nurse auditor"), Some(ConsoleRole::Auditor));
        assert_eq!(ConsoleRole::of("auditor admin"), Some(ConsoleRole::Admin));
        let auditor = ConsoleRole::Auditor;
        assert!(auditor.may(ConsoleAction::Review) && auditor.may(ConsoleAction::ReviewBreakGlass));
        assert!(!auditor.may(ConsoleAction::ManageAccounts));
        assert!(ConsoleRole::Admin.may(ConsoleAction::ManageAccounts));
    }
}
