{#- Saltpeter on the master: the engine's drop-in config and the jobs from pillar.

    Apply it on the master's own minion, whose Python must have the saltpeter
    package (the job states validate with the engine's validator):

      salt MASTER_MINION state.apply saltpeter.master

    Pillar (every key is optional):

      saltpeter:
        config_dir: /etc/saltpeter        # the engine's job directory
        master_config_dir: /etc/salt/master.d
        engine:                           # written to master.d/saltpeter.conf
          store_path: /var/cache/salt/master/saltpeter/saltpeter.db
          settings:                       # saltpeter_config keys
            machines_ws_port: 8889
        other_engines: []                 # engines to keep, see below
        job_file_mode: '0644'             # '0640' or '0600' when env holds secrets
        jobs:                             # job name: job file keys
          backup_databases:
            min: '0'
            hour: '2'
            dom: '*'
            mon: '*'
            dow: '*'
            targets: 'db*'
            command: /usr/local/bin/backup.sh
        jobs_absent: [old_report]         # jobs to remove from config_dir

    Salt 3008 reads master.d/*.conf over the main config one top-level key at a
    time, so the drop-in's engines list replaces the main config's. Engines
    other than saltpeter go into other_engines. The master reads the drop-in
    only when it starts, but the engine reads changed job files within 2 s. -#}
{%- set saltpeter = salt['pillar.get']('saltpeter', {}) %}
{%- set config_dir = saltpeter.get('config_dir', '/etc/saltpeter') %}
{%- set master_config_dir = saltpeter.get('master_config_dir', '/etc/salt/master.d') %}
{%- set engine = dict(saltpeter.get('engine', {}), config_dir=config_dir) %}
{%- set job_file_mode = saltpeter.get('job_file_mode', '0644') %}

saltpeter-engine-config:
  file.managed:
    - name: {{ (master_config_dir ~ '/saltpeter.conf') | yaml_dquote }}
    - source: salt://saltpeter/files/saltpeter.conf.jinja
    - template: jinja
    - mode: '0640'
    - makedirs: True
    - context:
        engine: {{ engine | json }}
        other_engines: {{ saltpeter.get('other_engines', []) | json }}

saltpeter-config-dir:
  file.directory:
    - name: {{ config_dir | yaml_dquote }}
    - mode: '0755'
    - makedirs: True

{%- for name, job in saltpeter.get('jobs', {}) | dictsort %}

saltpeter-job-{{ name }}:
  saltpeter.job_present:
    - name: {{ name | yaml_dquote }}
    - config_dir: {{ config_dir | yaml_dquote }}
    - mode: {{ job_file_mode | string | yaml_dquote }}
    {%- for key, value in job | dictsort %}
    - {{ key }}: {{ value | json }}
    {%- endfor %}
    - require:
      - file: saltpeter-config-dir
{%- endfor %}

{%- for name in saltpeter.get('jobs_absent', []) %}

saltpeter-job-absent-{{ name }}:
  saltpeter.job_absent:
    - name: {{ name | yaml_dquote }}
    - config_dir: {{ config_dir | yaml_dquote }}
{%- endfor %}
