"""pop3sf: a POP3 server framework whose mail comes from adapters."""

from pathlib import Path

from setuptools import setup

setup(
    name="pop3sf",
    version="2.0.0",
    description="POP3 server framework: serve any data source to ordinary mail clients",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.11",
    packages=["pop3sf", "pop3sf.adapters", "pop3sf.auxiliary"],
    package_dir={"pop3sf.adapters": "adapters", "pop3sf.auxiliary": "auxiliary"},
    package_data={"pop3sf": ["configspec.ini", "py.typed"]},
    install_requires=["configobj", "python-daemon", "bcrypt", "prometheus-client"],
    extras_require={
        "mysql": ["mysql-connector-python"],
        "pymysql": ["PyMySQL"],
        "postgresql": ["psycopg2"],
        "systemd": ["systemd-python"],
    },
    entry_points={
        "console_scripts": [
            "pop3sf = pop3sf.cli:main",
            "pop3sf-admin = pop3sf.auxiliary.admin:main",
        ],
        "pop3sf.adapters": [
            "list = pop3sf.adapters.memory:ListAdapter",
            "directory = pop3sf.adapters.directory:DirectoryAdapter",
            "directory_multi = pop3sf.adapters.directory:MultiUserDirectoryAdapter",
            "maildir = pop3sf.adapters.maildir:MaildirAdapter",
            "mysql = pop3sf.adapters.mysql:MySQLAdapter",
            "mysql_multi = pop3sf.adapters.mysql:MultiUserMySQLAdapter",
            "sql = pop3sf.adapters.sql:SQLAdapter",
            "journal = pop3sf.adapters.journal:JournalAdapter",
        ],
        # pop3sf-admin's support of an adapter, under the adapter's name.
        "pop3sf.admin_sources": [
            "directory = pop3sf.auxiliary.directory:DirectorySource",
            "directory_multi = pop3sf.auxiliary.directory:MultiUserDirectorySource",
            "maildir = pop3sf.auxiliary.maildir:MaildirSource",
            "mysql = pop3sf.auxiliary.mysql:SingleUserMySQLSource",
            "mysql_multi = pop3sf.auxiliary.mysql:MultiUserMySQLSource",
            "sql = pop3sf.auxiliary.sql:SQLSource",
            "journal = pop3sf.auxiliary.journal:JournalSource",
        ],
    },
    classifiers=[
        "License :: OSI Approved :: BSD License",
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Post-Office :: POP3",
    ],
)
