DROP TABLE subscription_outbox;
DROP TABLE subscription_state;
