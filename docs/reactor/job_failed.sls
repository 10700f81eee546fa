{#- Reactor for saltpeter/job/*/complete: when a run failed on any minion, fire
    ops/alert/saltpeter/<job> with the failed minions and their retcodes, for a
    notification reactor or an external event listener to pick up.

    Master config:

      reactor:
        - 'saltpeter/job/*/complete':
          - /srv/reactor/saltpeter/job_failed.sls

    The tag pattern also matches saltpeter/job/<job>/<minion>/complete, the
    result of one minion, whose data has no "success" key: the check below
    leaves those alone. -#}
{%- if data.get('success') is sameas false %}
{%-   set failed = {} %}
{%-   for minion, retcode in data.get('retcodes', {}).items() if retcode != 0 %}
{%-     do failed.update({minion: retcode}) %}
{%-   endfor %}
saltpeter-job-failed-{{ data['run_id'] }}:
  runner.event.send:
    - args:
      - tag: ops/alert/saltpeter/{{ data['job'] }}
      - data:
          job: {{ data['job'] | json }}
          run_id: {{ data['run_id'] | json }}
          failed: {{ failed | json }}
          ended: {{ data.get('ended') | json }}
{%- endif %}
