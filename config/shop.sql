-- The demo source: a small shop. Composite key, WITHOUT ROWID, NULLs, BLOBs,
-- a JSON text column and DATETIME columns.
PRAGMA journal_mode = WAL;

CREATE TABLE customers (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    email       TEXT UNIQUE,
    avatar      BLOB,
    preferences JSON,
    created_at  DATETIME NOT NULL DEFAULT (datetime('now'))
);

CREATE TABLE products (
    sku       TEXT PRIMARY KEY,
    name      TEXT NOT NULL,
    price     DECIMAL(10, 2) NOT NULL,
    weight_kg REAL,
    active    BOOLEAN NOT NULL DEFAULT 1
);

CREATE TABLE orders (
    id          INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    placed_at   DATETIME NOT NULL,
    status      TEXT NOT NULL DEFAULT 'new',
    note        TEXT
);

CREATE TABLE order_lines (
    order_id   INTEGER NOT NULL REFERENCES orders (id),
    line_no    INTEGER NOT NULL,
    sku        TEXT NOT NULL REFERENCES products (sku),
    quantity   INTEGER NOT NULL,
    unit_price DECIMAL(10, 2) NOT NULL,
    PRIMARY KEY (order_id, line_no)
) WITHOUT ROWID;

INSERT INTO customers (name, email, avatar, preferences, created_at) VALUES
    ('Ada Lovelace', 'ada@example.com', x'89504E470D0A1A0A', '{"newsletter": true, "language": "en"}', '2024-01-15 09:30:00'),
    ('Grace Hopper', 'grace@example.com', NULL, '{"newsletter": false}', '2024-02-01 14:05:12'),
    ('Alan Turing', NULL, NULL, NULL, '2024-03-10 08:00:00'),
    ('Émilie du Châtelet', 'emilie@example.fr', x'FFD8FFE0', '{"language": "fr", "tags": ["vip", "early"]}', '2024-04-22 19:45:30');

INSERT INTO products (sku, name, price, weight_kg, active) VALUES
    ('TEA-001', 'Green tea, 100 g', 4.50, 0.1, 1),
    ('MUG-002', 'Stoneware mug', 12.00, 0.35, 1),
    ('KET-003', 'Kettle', 39.99, 1.2, 1),
    ('OLD-004', 'Discontinued teapot', 25.00, NULL, 0);

INSERT INTO orders (id, customer_id, placed_at, status, note) VALUES
    (1001, 1, '2024-05-01 10:00:00', 'shipped', NULL),
    (1002, 2, '2024-05-02 11:30:00', 'new', 'leave at the door'),
    (1003, 4, '2024-05-03 16:20:00', 'new', NULL);

INSERT INTO order_lines (order_id, line_no, sku, quantity, unit_price) VALUES
    (1001, 1, 'TEA-001', 2, 4.50),
    (1001, 2, 'MUG-002', 1, 12.00),
    (1002, 1, 'KET-003', 1, 39.99),
    (1003, 1, 'TEA-001', 5, 4.50),
    (1003, 2, 'MUG-002', 2, 12.00);
