-- Nonces never repeat across backends: 40 separate backends (dblink) encrypt 250 values each.
-- Each backend seeds its own generator after fork, so each draws its own 96-bit nonce prefix.
CREATE TABLE nonce_log (backend int, env bytea);
DO $$
DECLARE i int;
BEGIN
  FOR i IN 1 .. 40 LOOP
    PERFORM dblink_connect('n', format('host=%s port=%s dbname=%s user=%s',
            current_setting('unix_socket_directories'), current_setting('port'), current_database(), current_user));
    PERFORM dblink_exec('n', 'SET app.tenant_id = ''acme''');
    PERFORM dblink_exec('n', format('INSERT INTO nonce_log SELECT %s, envelope.encrypt_field(g::text) FROM generate_series(1, 250) g', i));
    PERFORM dblink_disconnect('n');
  END LOOP;
END $$;
SELECT count(*) AS envelopes,
       count(DISTINCT substring(env FROM 43 FOR 24)) AS distinct_nonces,
       count(DISTINCT substring(env FROM 43 FOR 12)) AS distinct_prefixes,
       count(DISTINCT backend) AS backends
  FROM nonce_log;
-- Within one backend the prefix is fixed (cached derived key) and the suffix is fresh per value.
SELECT count(*) AS backends_with_more_than_one_prefix
  FROM (SELECT backend FROM nonce_log GROUP BY backend HAVING count(DISTINCT substring(env FROM 43 FOR 12)) <> 1) x;
-- And every value decrypts.
SET app.tenant_id = 'acme';
SELECT count(*) FILTER (WHERE envelope.decrypt_field(env) ~ '^[0-9]+$') AS decrypted FROM nonce_log;
DROP TABLE nonce_log;
